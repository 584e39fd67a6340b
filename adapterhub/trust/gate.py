"""Trust policy where artifacts leave the registry or feed a conversion.

- ``pull``: writes the artifact's signature beside the files (``model.sig``)
  and, when a policy or ``--require-signature`` asks for it, verifies the
  staged files with model_signing before they are renamed into place: fail
  closed, nothing is left in DEST. ``require-provenance`` checks the signed
  provenance chain of a merged or quantized artifact before anything is written.
- ``check_inputs``: the same rules for conversion inputs, before any work: a
  signature under ``require-signature``, and under ``require-provenance`` a
  provenance chain in which no link fails for a derived registry input.
- ``sign_output``: a conversion pushed to the registry is signed (its files and
  its provenance) with the default key, when there is one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub import config
from adapterhub.errors import TrustError, UsageError
from adapterhub.fsutil import write_atomic
from adapterhub.trust.signing import (
    SIGNATURE_FILE,
    VerifyReport,
    _check_rows,
    artifact_view,
)

if TYPE_CHECKING:
    from adapterhub.registry import PullResult, Registry
    from adapterhub.registry.index import VersionInfo

    from adapterhub.manifest import FileEntry
    from adapterhub.sources import Source


def _preferred_signature(reg: Registry, info: VersionInfo) -> str | None:
    """The newest signature by a usable trusted key, else the newest signature."""
    from adapterhub.trust import policy
    from adapterhub.trust.signing import parse_bundle

    rows = reg.signatures(info.digest, kind="model")
    for row in rows:
        tk = policy.lookup(reg, row["key_id"])
        if tk is not None and tk.problem(policy.namespace_of(info.name)) is None:
            try:
                parse_bundle(reg.read_signature(row["blob"]))
                return row["blob"]
            except Exception:  # noqa: BLE001 - a bad one is skipped here; verify reports it
                continue
    return rows[0]["blob"] if rows else None


def pull(
    reg: Registry,
    ref: str,
    dest: str | os.PathLike,
    *,
    force: bool = False,
    progress: Any = None,
    require_signature: bool = False,
    require_provenance: bool = False,
    signature_file: str | None = SIGNATURE_FILE,
    link: bool = False,
) -> tuple[PullResult, dict[str, Any]]:
    """``Registry.pull`` with the signature written out and the trust policy enforced."""
    from adapterhub.trust import policy
    from adapterhub.trust.provenance import is_derived, verify_chain

    info = reg.resolve(ref)
    label = f"{info.name}:{info.version}"
    rules = policy.required(reg, info.name)
    need_sig = require_signature or "require-signature" in rules
    need_prov = require_provenance or "require-provenance" in rules
    outcome: dict[str, Any] = {"signature_required": need_sig, "provenance_required": need_prov}
    if signature_file is not None:
        from adapterhub.manifest import check_relpath

        check_relpath(signature_file)
    if need_prov and is_derived(reg, info.digest):
        chain = verify_chain(reg, label)
        if not chain.ok:
            raise TrustError(chain.problem(), hint="`adapterhub provenance REF` shows the chain")
        outcome["provenance"] = chain.verdict

    if need_sig and force and Path(dest).is_dir() and any(Path(dest).iterdir()):
        # --force writes into DEST file by file, so check the stored files first:
        # a refused artifact must not overwrite anything there.
        from adapterhub.trust.signing import verify_ref

        pre = verify_ref(reg, label)
        if not pre.ok:
            raise TrustError(pre.problem())

    def on_staged(root: Path, v: VersionInfo, entries: list[FileEntry], staged: bool) -> None:
        if signature_file is not None and signature_file in {e.path for e in entries}:
            raise UsageError(f"{label} has a file named {signature_file}; pick another --signature-file")
        chosen = None
        if need_sig:
            if not reg.signatures(v.digest, kind="model"):
                raise TrustError(f"{label} is not signed, and the trust policy requires a signature", hint="`adapterhub sign REF` signs it")
            if staged:  # root holds exactly the artifact's files
                checks = _check_rows(reg, v, root, None)
            else:
                with artifact_view(reg, entries, v.name.split("/")[-1], sources={e.path: root / e.path for e in entries}) as view:
                    checks = _check_rows(reg, v, view, None)
            report = VerifyReport(label, v.digest, checks)
            if not report.ok:
                raise TrustError(report.problem())
            ok = report.verified
            assert ok is not None
            chosen = ok.blob
            outcome["signature"] = {"verified": True, "key_id": ok.key_id, "key_name": ok.key_name}
        else:
            chosen = _preferred_signature(reg, v)
        if chosen and signature_file is not None:
            target = root / signature_file
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(target, data=reg.read_signature(chosen))
            outcome["signature_file"] = signature_file

    res = reg.pull(ref, dest, force=force, progress=progress, on_staged=on_staged, link=link)
    return res, outcome


def _open_registry(registry: Registry | None, needed: bool) -> Registry | None:
    if registry is not None:
        return registry
    if not needed and not (config.home() / "index.db").exists():
        return None  # no registry, so no policy: do not create one as a side effect
    from adapterhub.registry import Registry

    return Registry()


def check_inputs(inputs: dict[str, Source], registry: Registry | None, require_signature: bool = False) -> dict[str, Any]:
    """Refuse conversion inputs the trust policy (or the flag) refuses: unsigned or
    untrusted ones under ``require-signature``, derived registry inputs whose
    provenance does not verify under ``require-provenance``."""
    from adapterhub.trust import policy
    from adapterhub.trust.provenance import is_derived, verify_chain
    from adapterhub.trust.signing import verify_dir, verify_ref

    reg = _open_registry(registry, require_signature)
    if reg is None:
        return {}
    out: dict[str, Any] = {}
    for key, src in inputs.items():
        if src.origin == "registry" and src.ref:
            name = src.ref.rsplit(":", 1)[0]
            rules = policy.required(reg, name)
            if "require-provenance" in rules and is_derived(reg, reg.resolve(src.ref).digest):
                chain = verify_chain(reg, src.ref)
                if not chain.ok:
                    raise TrustError(f"{key} input: {chain.problem()}", hint=f"`adapterhub provenance {src.ref}` shows the chain")
                out[key] = {"provenance": chain.verdict}
            if not (require_signature or "require-signature" in rules):
                continue
            report = verify_ref(reg, src.ref)
            if not report.ok and not report.checks:
                raise TrustError(
                    f"{key} input: {report.problem()}, and the trust policy requires a signature",
                    hint=f"`adapterhub sign {src.ref}` signs it with your default key",
                )
        else:
            if not (require_signature or "require-signature" in policy.required(reg, "")):
                continue
            if src.root is None or not src.root.is_dir() or not (src.root / SIGNATURE_FILE).exists():
                raise TrustError(f"{key} input {src.describe()} is not signed (no {SIGNATURE_FILE}), and the trust policy requires a signature")
            report = verify_dir(src.root, reg=reg)
        if not report.ok:
            raise TrustError(f"{key} input: {report.problem()}")
        v = report.verified
        out[key] = {**out.get(key, {}), "verified": True, "key_id": v.key_id if v else None}
    return out


def sign_output(reg: Registry, ref: str, sign: bool | None) -> dict[str, Any] | None:
    """Sign a pushed conversion output (files and provenance). ``sign=None``:
    only when a default key exists and opens without a prompt."""
    from adapterhub.trust import keys
    from adapterhub.trust import provenance
    from adapterhub.trust.signing import resolve_key, sign_ref

    if sign is False:
        return None
    if sign is None:
        key = keys.default_key()
        if key is None or key.private_path is None:
            return None
        if key.encrypted and not os.environ.get(keys.PASSPHRASE_ENV):
            return {"skipped": f"key {key.name!r} is encrypted and {keys.PASSPHRASE_ENV} is not set; sign later with `adapterhub sign {ref} --provenance`"}
    else:
        key = resolve_key(None)
    s = sign_ref(reg, ref, key)
    p = provenance.sign(reg, ref, key)
    return {"key_id": s.key_id, "key_name": key.name, "signature": s.blob, "provenance": p.blob}
