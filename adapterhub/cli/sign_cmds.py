"""sign, verify-signature, provenance."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from adapterhub.cli._common import namespace_option, prompt_passphrase, registry, short_id
from adapterhub.cli._output import Output, echo, json_option, say


@click.command(name="sign")
@click.argument("ref")
@click.option("--key", "key_name", help="Signing key name (default: the default key).")
@click.option("--provenance", "with_provenance", is_flag=True, help="Also sign REF's recorded lineage as a provenance attestation.")
@json_option
def sign_cmd(ref: str, key_name: str | None, with_provenance: bool, json_: bool):
    """Sign exactly the files of REF in the OpenSSF model-signing format.

    The signature (a Sigstore bundle with a DSSE-signed in-toto statement,
    `files` method, sha256) is stored in the registry with the artifact and
    written as model.sig by `pull`. Its subject digest is REF's digest.

    \b
    Examples:
      adapterhub sign team/qa-lora:3
      adapterhub sign team/qa-merged --key release --provenance
    """
    from adapterhub.trust import provenance
    from adapterhub.trust.signing import resolve_key, sign_ref

    out = Output(json_)
    key = resolve_key(key_name)
    with registry() as reg:
        res = sign_ref(reg, ref, key, prompt=prompt_passphrase)
        prov = provenance.sign(reg, ref, key, prompt=prompt_passphrase) if with_provenance else None
    data = {**res.to_dict(), "provenance": prov.to_dict() if prov else None}

    def human():
        echo(f"signed {res.ref}  {res.digest[:19]}  with key {key.name} ({short_id(res.key_id)})")
        if prov:
            echo(f"signed provenance of {prov.ref}")

    out.result(data, human)


@click.command(name="verify-signature")
@click.argument("target")
@click.option("--key", "pub", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Check against this public key PEM instead of the trusted keys.")
@click.option("--signature", "sig", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="For a directory: the bundle (default DIR/model.sig).")
@namespace_option("For a directory: judge it as a name in this namespace (keys trusted for it count).")
@json_option
def verify_signature(target: str, pub: Path | None, sig: Path | None, namespace: str | None, json_: bool):
    """Re-hash the files of REF (or DIR) and check their signatures.

    A signature counts when its files, subject digest and DSSE signature all
    verify and its key is trusted (not revoked, not expired, in scope), or is
    the key given with --key. Exits 8 when none does.

    \b
    Examples:
      adapterhub verify-signature team/qa-lora:3
      adapterhub verify-signature ./qa-lora --key alice.pub
    """
    from adapterhub.errors import TrustError
    from adapterhub.trust.keys import load_public_pem
    from adapterhub.trust.signing import verify_dir, verify_ref

    out = Output(json_)
    pem = load_public_pem(pub.read_bytes(), str(pub)) if pub else None
    with registry() as reg:
        if Path(target).is_dir():
            report = verify_dir(Path(target), reg=reg, signature=sig, public_pem=pem, namespace=namespace)
        else:
            report = verify_ref(reg, target, public_pem=pem)

    def human():
        for c in report.checks:
            who = c.key_name or short_id(c.key_id)
            echo(f"{'ok  ' if c.ok else 'FAIL'}  key {who}: {c.reason}")

    out.result(report.to_dict(), human)
    if not report.ok:  # the report is the output; like fsck, say why on stderr and exit 8
        say("error", report.problem())
        sys.exit(TrustError.exit_code)
    if not json_:
        echo(f"verified {report.target}  {report.digest[:19] if report.digest else ''}", err=True)


@click.command(name="provenance")
@click.argument("ref")
@click.option("--allow-incomplete", is_flag=True, help="Exit 0 when the chain is incomplete (nothing failed, but some link cannot be verified).")
@json_option
def provenance_cmd(ref: str, allow_incomplete: bool, json_: bool):
    """Show REF's provenance chain and verify every link.

    A derived artifact (merged, quantized) needs an attestation by a trusted
    key whose inputs equal the recorded lineage; a source (adapter, base)
    needs a signature by a trusted key. Each link is verified, unverifiable
    (not in this registry, or an unsigned source) or failed (no attestation,
    or every signature fails: a revoked, expired or untrusted key, tampering).
    The verdict is `verified`, `incomplete` (some link is unverifiable) or
    `failed`. Exits 0 only when verified; 8 when failed or incomplete
    (--allow-incomplete: 0 when incomplete).

    \b
    Examples:
      adapterhub provenance team/qa-nf4
      adapterhub provenance team/qa-merged:1 --json
    """
    from adapterhub.errors import TrustError
    from adapterhub.trust.provenance import verify_chain

    out = Output(json_)
    with registry() as reg:
        chain = verify_chain(reg, ref)
    marks = {"verified": "ok  ", "unverifiable": "??  ", "failed": "FAIL"}

    def human():
        for link in chain.links:
            pad = "  " * link.depth
            rel = f"{link.relation}: " if link.relation else ""
            refs = ", ".join(link.refs) or link.digest[:19]
            echo(f"{marks[link.status]} {pad}{rel}{refs}  [{link.kind or '?'}]")
            echo(f"     {pad}  provenance: {link.provenance}" + (f" (key {link.key_name or short_id(link.key_id)})" if link.key_id and link.ok else ""))
            echo(f"     {pad}  signature:  {link.signature}")

    out.result(chain.to_dict(), human)
    if chain.verdict == "verified":
        if not json_:
            echo(f"verdict: verified {chain.ref}", err=True)
        return
    if chain.verdict == "incomplete" and allow_incomplete:
        say("warning", chain.problem())
        return
    say("error", chain.problem())
    sys.exit(TrustError.exit_code)
