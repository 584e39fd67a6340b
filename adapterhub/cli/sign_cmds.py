"""keys, sign, verify-signature, trust, policy, provenance."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from adapterhub.cli._output import Output, json_option, table


def _registry():
    from adapterhub.registry import Registry

    return Registry()


def prompt_passphrase(name: str) -> str | None:
    """Ask on a terminal; None where there is none (the caller then fails with a hint)."""
    if not sys.stdin.isatty():
        return None
    return click.prompt(f"passphrase for key {name!r}", hide_input=True, err=True)


def _short(key_id: str | None) -> str:
    return (key_id or "-")[:16]


def _known_as(asked: str, tk) -> str:
    """How a trusted key is known now: its trusted name, and the name it was asked by when that differs."""
    name = tk.name or _short(tk.key_id)
    ident = asked.removeprefix("sha256:")
    if asked != tk.name and not tk.key_id.startswith(ident):
        return f"{name} (asked for as {asked!r}) {tk.key_id}"
    return f"{name} {tk.key_id}"


# -- keys -------------------------------------------------------------------------------


@click.group(name="keys")
def keys_group():
    """Manage signing keys (EC P-256) under $ADAPTERHUB_HOME/keys.

    Private keys are stored with mode 0600, optionally encrypted with a
    passphrase (asked on a terminal, or read from ADAPTERHUB_KEY_PASSPHRASE).
    A key id is the sha256 of the public key PEM, the key hint model-signing
    writes into a bundle. The default signing key is $ADAPTERHUB_KEY, else the
    key named `default`, else the only key.

    \b
    Examples:
      adapterhub keys generate
      adapterhub keys generate release --passphrase
      adapterhub keys list
      adapterhub keys export release > release.pub
    """


@keys_group.command(name="generate")
@click.argument("name", default="default")
@click.option("--passphrase", "encrypt", is_flag=True, help="Encrypt the private key (passphrase from a prompt or ADAPTERHUB_KEY_PASSPHRASE).")
@click.option("--no-trust", is_flag=True, help="Do not add the new public key to the trusted keys.")
@json_option
def keys_generate(name: str, encrypt: bool, no_trust: bool, json_: bool):
    """Create an EC P-256 key pair and trust its public key.

    \b
    Examples:
      adapterhub keys generate
      ADAPTERHUB_KEY_PASSPHRASE=... adapterhub keys generate ci --passphrase
    """
    from adapterhub.trust import keys
    from adapterhub.trust import policy
    from adapterhub.errors import UsageError

    out = Output(json_)
    passphrase = None
    if encrypt:
        passphrase = os.environ.get(keys.PASSPHRASE_ENV)
        if not passphrase:
            if not sys.stdin.isatty():
                raise UsageError(f"--passphrase needs a terminal or {keys.PASSPHRASE_ENV}")
            passphrase = click.prompt("new passphrase", hide_input=True, confirmation_prompt=True, err=True)
    k = keys.generate(name, passphrase=passphrase)
    if not no_trust:
        with _registry() as reg:
            policy.add(reg, k.public_pem, name=k.name)
    out.result(
        {**k.to_dict(), "trusted": not no_trust},
        lambda: click.echo(f"generated key {k.name}  {k.key_id}" + ("  (encrypted)" if k.encrypted else "") + ("" if no_trust else "  trusted")),
    )


@keys_group.command(name="list")
@json_option
def keys_list(json_: bool):
    """List your keys.

    \b
    Example:
      adapterhub keys list --json
    """
    from adapterhub.trust import keys

    out = Output(json_)
    ks = keys.list_keys()
    default = keys.default_key() if ks else None
    rows = [(k.name, k.key_id[:16], "yes" if k.private_path else "public only", "yes" if k.encrypted else "no",
             "*" if default and default.name == k.name else "") for k in ks]
    out.result(
        [{**k.to_dict(), "default": bool(default and default.name == k.name)} for k in ks],
        lambda: table(("name", "key id", "private", "encrypted", "default"), rows) if ks else click.echo("no keys: `adapterhub keys generate` makes one", err=True),
    )


@keys_group.command(name="export")
@click.argument("name")
@click.option("--private", is_flag=True, help="Print the private key PEM (as stored: encrypted if it is).")
@json_option
def keys_export(name: str, private: bool, json_: bool):
    """Print a key's public key PEM (what others pass to `trust add`).

    With --json: {"name", "key_id", "public_key_pem"} (and "private_key_pem"
    with --private).

    \b
    Examples:
      adapterhub keys export default > default.pub
      adapterhub keys export default --json
      model_signing verify key ./qa --signature ./qa/model.sig --public_key default.pub
    """
    from adapterhub.trust import keys
    from adapterhub.errors import NotFoundError

    k = keys.get(name)
    if private and k.private_path is None:
        raise NotFoundError(f"key {name!r} has no private key here")
    data = {"name": k.name, "key_id": k.key_id, "public_key_pem": k.public_path.read_text()}
    if private:
        assert k.private_path is not None
        data["private_key_pem"] = k.private_path.read_text()
    pem = data["private_key_pem"] if private else data["public_key_pem"]
    Output(json_).result(data, lambda: click.echo(pem, nl=False))


@keys_group.command(name="import")
@click.argument("name")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
def keys_import(name: str, path: Path, json_: bool):
    """Import a PEM EC private key (to sign with) or public key as NAME.

    An encrypted private key keeps its passphrase (ADAPTERHUB_KEY_PASSPHRASE
    or a prompt). Importing does not trust the key: use `trust add`.

    \b
    Example:
      adapterhub keys import release ./release.pem
    """
    from adapterhub.trust import keys

    pem = path.read_bytes()
    passphrase = None
    if b"ENCRYPTED" in pem.split(b"\n", 1)[0]:
        passphrase = os.environ.get(keys.PASSPHRASE_ENV) or prompt_passphrase(name)
    k = keys.import_key(name, pem, passphrase=passphrase, new_passphrase=passphrase)
    Output(json_).result(k.to_dict(), lambda: click.echo(f"imported key {k.name}  {k.key_id}"))


@keys_group.command(name="rm")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask.")
@json_option
def keys_rm(name: str, yes: bool, json_: bool):
    """Delete a key's files. Its signatures stay valid while its public key is trusted.

    \b
    Example:
      adapterhub keys rm old --yes
    """
    from adapterhub.trust import keys
    from adapterhub.errors import UsageError

    k = keys.get(name)
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError("pass --yes to delete a key without a terminal")
        click.confirm(f"delete key {k.name} ({k.key_id[:16]}…)?", abort=True, err=True)
    keys.remove(name)
    Output(json_).result(k.to_dict(), lambda: click.echo(f"deleted key {k.name}"))


@keys_group.command(name="revoke")
@click.argument("key")
@click.option("--reason", help="Recorded with the revocation.")
@json_option
def keys_revoke(key: str, reason: str | None, json_: bool):
    """Revoke KEY (a name or key id): its signatures fail from now on.

    \b
    Example:
      adapterhub keys revoke release --reason "laptop stolen"
    """
    from adapterhub.trust import keys
    from adapterhub.trust import policy

    pem = None
    try:
        pem = keys.get(key).public_pem
    except Exception:  # noqa: BLE001 - a trusted key that is not a local key
        pass
    with _registry() as reg:
        tk = policy.revoke(reg, key, reason, public_pem=pem)
    Output(json_).result(tk.to_dict(), lambda: click.echo(f"revoked key {_known_as(key, tk)}"))


# -- sign / verify -----------------------------------------------------------------------


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
    with _registry() as reg:
        res = sign_ref(reg, ref, key, prompt=prompt_passphrase)
        prov = provenance.sign(reg, ref, key, prompt=prompt_passphrase) if with_provenance else None
    data = {**res.to_dict(), "provenance": prov.to_dict() if prov else None}

    def human():
        click.echo(f"signed {res.ref}  {res.digest[:19]}  with key {key.name} ({_short(res.key_id)})")
        if prov:
            click.echo(f"signed provenance of {prov.ref}")

    out.result(data, human)


@click.command(name="verify-signature")
@click.argument("target")
@click.option("--key", "pub", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Check against this public key PEM instead of the trusted keys.")
@click.option("--signature", "sig", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="For a directory: the bundle (default DIR/model.sig).")
@click.option("--namespace", help="For a directory: the namespace whose scoped keys count.")
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
    with _registry() as reg:
        if Path(target).is_dir():
            report = verify_dir(Path(target), reg=reg, signature=sig, public_pem=pem, namespace=namespace)
        else:
            report = verify_ref(reg, target, public_pem=pem)

    def human():
        for c in report.checks:
            who = c.key_name or _short(c.key_id)
            click.echo(f"{'ok  ' if c.ok else 'FAIL'}  key {who}: {c.reason}")

    out.result(report.to_dict(), human)
    if not report.ok:  # the report is the output; like fsck, say why on stderr and exit 8
        click.echo(f"error: {report.problem()}", err=True)
        sys.exit(TrustError.exit_code)
    if not json_:
        click.echo(f"verified {report.target}  {report.digest[:19] if report.digest else ''}", err=True)


# -- trust -------------------------------------------------------------------------------


@click.group(name="trust")
def trust_group():
    """Manage the public keys whose signatures count.

    \b
    Examples:
      adapterhub trust add alice.pub --name alice --scope team
      adapterhub trust ls
      adapterhub trust rm alice
    """


@trust_group.command(name="add")
@click.argument("pub", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="A name to show for the key.")
@click.option("--scope", "scopes", multiple=True, metavar="NAMESPACE", help="Trust it only for this namespace (repeatable).")
@click.option("--expires", help="Signatures by this key fail from this date (YYYY-MM-DD, in the future).")
@click.option("--replace", is_flag=True, help="The key is already listed: set its name, scope and expiry anew (and clear a revocation).")
@json_option
def trust_add(pub: Path, name: str | None, scopes: tuple[str, ...], expires: str | None, replace: bool, json_: bool):
    """Trust the EC public key in PUB (PEM).

    Adding a key that is already listed (trusted or revoked) with another
    name, scope or expiry exits 5 and says what would change; --replace
    changes it. An --expires date in the past exits 2.

    \b
    Examples:
      adapterhub trust add alice.pub --name alice --scope team --expires 2027-01-01
      adapterhub trust add alice.pub --name alice --scope team --scope ml --replace
    """
    from adapterhub.trust import policy

    not_after = policy.parse_expiry(expires) if expires else None
    with _registry() as reg:
        tk = policy.add(reg, pub.read_bytes(), name=name, scopes=scopes, not_after=not_after, replace=replace)
    Output(json_).result(tk.to_dict(), lambda: click.echo(f"trusted key {tk.name or _short(tk.key_id)} {tk.key_id}"))


@trust_group.command(name="ls")
@json_option
def trust_ls(json_: bool):
    """List trusted (and revoked) keys.

    \b
    Example:
      adapterhub trust ls --json
    """
    from adapterhub.trust import policy

    with _registry() as reg:
        ks = policy.ls(reg)
    rows = [
        (k.name, k.key_id[:16], ",".join(k.scopes) or "all", k.not_after, f"revoked {k.revoked_at}" if k.revoked_at else "trusted")
        for k in ks
    ]
    Output(json_).result(
        [k.to_dict() for k in ks],
        lambda: table(("name", "key id", "scope", "expires", "status"), rows) if ks else click.echo("no trusted keys", err=True),
    )


@trust_group.command(name="rm")
@click.argument("key")
@json_option
def trust_rm(key: str, json_: bool):
    """Stop trusting KEY (name or key id): its signatures fail from now on.

    \b
    Example:
      adapterhub trust rm alice
    """
    from adapterhub.trust import policy

    with _registry() as reg:
        tk = policy.remove(reg, key)
    Output(json_).result(tk.to_dict(), lambda: click.echo(f"no longer trusted: {_known_as(key, tk)}"))


# -- policy ------------------------------------------------------------------------------

_RULE = click.Choice(["require-signature", "require-provenance"])


@click.group(name="policy")
def policy_group():
    """Trust policy: what pull and conversions refuse (fail closed, exit 8).

    require-signature: an artifact needs a valid signature by a trusted key.
    require-provenance: a merged or quantized artifact (pulled, or taken
    from the registry by a conversion) needs a signed provenance chain in
    which no link fails (`adapterhub provenance REF` shows it).

    \b
    Examples:
      adapterhub policy set require-signature
      adapterhub policy set require-provenance --namespace team
      adapterhub policy show
      adapterhub policy unset require-signature
    """


@policy_group.command(name="set")
@click.argument("rule", type=_RULE)
@click.option("--namespace", help="Only for names in this namespace (default: everywhere).")
@json_option
def policy_set(rule: str, namespace: str | None, json_: bool):
    """Add a rule.

    \b
    Example:
      adapterhub policy set require-signature --namespace team
    """
    from adapterhub.trust import policy

    with _registry() as reg:
        r = policy.set_rule(reg, rule, namespace)
    Output(json_).result(r, lambda: click.echo(f"policy: {rule} for {r['namespace']}"))


@policy_group.command(name="unset")
@click.argument("rule", type=_RULE)
@click.option("--namespace", help="The namespace the rule was set for (default: everywhere).")
@json_option
def policy_unset(rule: str, namespace: str | None, json_: bool):
    """Remove a rule.

    \b
    Example:
      adapterhub policy unset require-signature
    """
    from adapterhub.trust import policy

    with _registry() as reg:
        r = policy.unset_rule(reg, rule, namespace)
    Output(json_).result(r, lambda: click.echo(f"removed policy: {rule} for {r['namespace']}"))


@policy_group.command(name="show")
@json_option
def policy_show(json_: bool):
    """Show the rules.

    \b
    Example:
      adapterhub policy show --json
    """
    from adapterhub.trust import policy

    with _registry() as reg:
        rs = policy.rules(reg)
    Output(json_).result(
        rs,
        lambda: table(("namespace", "rule", "since"), [(r["namespace"], r["rule"], r["created_at"]) for r in rs]) if rs else click.echo("no policy: nothing is required", err=True),
    )


# -- provenance ----------------------------------------------------------------------------


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
    with _registry() as reg:
        chain = verify_chain(reg, ref)
    marks = {"verified": "ok  ", "unverifiable": "??  ", "failed": "FAIL"}

    def human():
        for link in chain.links:
            pad = "  " * link.depth
            rel = f"{link.relation}: " if link.relation else ""
            refs = ", ".join(link.refs) or link.digest[:19]
            click.echo(f"{marks[link.status]} {pad}{rel}{refs}  [{link.kind or '?'}]")
            click.echo(f"     {pad}  provenance: {link.provenance}" + (f" (key {link.key_name or _short(link.key_id)})" if link.key_id and link.ok else ""))
            click.echo(f"     {pad}  signature:  {link.signature}")

    out.result(chain.to_dict(), human)
    if chain.verdict == "verified":
        if not json_:
            click.echo(f"verdict: verified {chain.ref}", err=True)
        return
    if chain.verdict == "incomplete" and allow_incomplete:
        click.echo(f"warning: {chain.problem()}", err=True)
        return
    click.echo(f"error: {chain.problem()}", err=True)
    sys.exit(TrustError.exit_code)
