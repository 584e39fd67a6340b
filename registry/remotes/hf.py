"""The Hugging Face Hub as a remote: ``hf://org/repo[@revision]``.

``push`` uploads one registry version as one commit, ``pull`` imports a Hub
repo (or a snapshot already in the local Hugging Face cache, offline) into the
registry, and ``search`` lists an organisation's models. huggingface_hub does
the transfers and owns the download cache; it is imported inside the functions
so that the CLI starts fast.

What a pushed repo holds (README.md, "Hugging Face Hub"):

- every file of the artifact, byte for byte;
- ``README.md``: a model card with Hub metadata (``base_model``,
  ``base_model_relation``, ``library_name``, tags). When the artifact has its
  own ``README.md``, the Hub gets that card with our metadata merged into its
  front matter, and the original bytes travel in ``adapterhub.json``;
- ``adapterhub.json``: name, version, digest, file list, inspection, lineage,
  registry tags, and how the card was made (``METADATA_FILE``);
- ``model.sig`` / ``provenance.sig``: the artifact's model-signing bundle and
  its signed provenance, when it has them.

A pull drops what the push added and restores the original card, so a round
trip local -> Hub -> local gives the same artifact digest, and the signature
still verifies. Each version becomes a Hub tag (``version_tag``); registry tags
such as ``prod`` are mutable and stay local (they are listed in
``adapterhub.json`` but not restored).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import (
    AdapterhubError,
    ConflictError,
    IntegrityError,
    InvalidArtifactError,
    InvalidNameError,
    NotFoundError,
    RemoteAuthError,
    RemoteError,
    TrustError,
)

if TYPE_CHECKING:
    from adapterhub.registry import Registry
    from adapterhub.registry.index import VersionInfo

SCHEME = "hf://"
DEFAULT_ENDPOINT = "https://huggingface.co"
CARD_FILE = "README.md"
METADATA_FILE = "adapterhub.json"
SIGNATURE_FILE = "model.sig"  # the same name `adapterhub pull` writes and model_signing expects
PROVENANCE_FILE = "provenance.sig"
# Files the push adds beside the artifact's own; an artifact may not hold them.
RESERVED = (METADATA_FILE, SIGNATURE_FILE, PROVENANCE_FILE)
FORMAT = "adapterhub/hf-remote"
FORMAT_VERSION = 1

_REVISION_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/+-]{0,199}$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_RELATIONS = {"adapter": "adapter", "merged": "merged", "quantized": "quantized", "gguf": "quantized"}
_BNB = ("nf4", "fp4", "int8")
# PEFT task types -> the transformers class a usage snippet loads the base with.
_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}


# -- URLs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HubRepo:
    """A parsed ``hf://org/repo[@revision]``."""

    repo_id: str
    revision: str | None = None

    @property
    def url(self) -> str:
        return SCHEME + self.repo_id + (f"@{self.revision}" if self.revision else "")

    def __str__(self) -> str:
        return self.url


def parse_url(url: str) -> HubRepo:
    """``hf://org/repo[@revision]`` -> ``HubRepo``; names are checked with huggingface_hub's validator.

    >>> parse_url("hf://team/qa-lora@v3")
    HubRepo(repo_id='team/qa-lora', revision='v3')
    """
    if not url.startswith(SCHEME):
        raise InvalidNameError(f"{url!r} is not a Hugging Face Hub URL", hint="write hf://ORG/REPO[@REVISION]")
    repo_id, at, revision = url[len(SCHEME):].partition("@")
    if repo_id.count("/") != 1:
        raise InvalidNameError(
            f"invalid Hub repo {url!r}: expected hf://ORG/REPO", hint="for example hf://my-org/qa-lora"
        )
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise InvalidNameError(f"invalid Hub repo id {repo_id!r}: {str(e).splitlines()[0]}") from None
    if at and not (_REVISION_RE.match(revision) and ".." not in revision and not revision.endswith((".", "/"))):
        raise InvalidNameError(
            f"invalid revision {revision!r} in {url!r}", hint="a branch, tag or commit: hf://org/repo@main, @v3, @<sha>"
        )
    return HubRepo(repo_id, revision if at else None)


def parse_org_url(url: str) -> tuple[str, str | None]:
    """``hf://org`` or ``hf://org/prefix`` -> (org, search text or None)."""
    if not url.startswith(SCHEME):
        raise InvalidNameError(f"{url!r} is not a Hugging Face Hub URL", hint="write hf://ORG")
    org, _, rest = url[len(SCHEME):].strip("/").partition("/")
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$", org) or "--" in org or ".." in org:
        raise InvalidNameError(f"invalid Hub organisation in {url!r}", hint="write hf://ORG")
    return org, rest or None


def version_tag(version: str) -> str:
    """The Hub tag of a registry version: ``3`` -> ``v3``, ``1.2.0`` -> ``v1.2.0``, ``beta`` -> ``beta``."""
    return f"v{version}" if version[:1].isdigit() else version


def name_for(repo_id: str) -> str:
    """A registry name derived from a Hub repo id: ``Org/Qa_LoRA`` -> ``org/qa_lora``."""
    from adapterhub.refs import check_name

    parts = []
    for part in repo_id.lower().split("/"):
        part = re.sub(r"[^a-z0-9._-]", "-", part).lstrip("._-")
        parts.append(part or "hub")
    return check_name("/".join(parts)[:128])


# -- the model card -----------------------------------------------------------------


def card_metadata(inspection: Mapping[str, Any]) -> dict[str, Any]:
    """Hub front matter for an artifact: base model, relation, library and tags."""
    kind = inspection.get("kind")
    meta: dict[str, Any] = {}
    base = inspection.get("base_model")
    # The Hub links base_model to a repo; a local path there would be a dead link.
    if isinstance(base, str) and _HUB_ID_RE.match(base) and kind in _RELATIONS:
        meta["base_model"] = base
        meta["base_model_relation"] = _RELATIONS[kind]
    if kind == "adapter" and inspection.get("format") == "peft":
        meta["library_name"] = "peft"
    elif kind in ("merged", "quantized", "checkpoint") and inspection.get("format") == "transformers":
        meta["library_name"] = "transformers"
    tags = ["adapterhub"]
    method = inspection.get("method")
    if method:
        tags.append(str(method).lower())
    if kind == "adapter":
        tags.append("peft")
    elif kind in ("merged", "quantized", "gguf"):
        tags.append(kind)
    if inspection.get("rank") is not None:
        tags.append(f"rank-{inspection['rank']}")
    quant = inspection.get("quant")
    if quant:
        tags.append(str(quant).lower())
        if str(quant).lower() in _BNB:
            tags.append("bitsandbytes")
    if kind == "gguf":
        tags.append("gguf")
    meta["tags"] = list(dict.fromkeys(tags))
    return meta


def _card_body(info: VersionInfo, inspection: Mapping[str, Any], repo_id: str, signed: bool) -> str:
    from adapterhub import __version__

    kind = inspection.get("kind") or "artifact"
    method = inspection.get("method")
    base = inspection.get("base_model")
    what = f"{method} {kind}" if method and kind == "adapter" else kind
    lines = [f"# {info.name}:{info.version}", ""]
    if info.description:
        lines += [info.description, ""]
    lines.append(
        f"A {what}" + (f" for `{base}`" if base else "") + f", pushed from an adapterhub {__version__} registry."
    )
    lines += ["", "| | |", "|---|---|", f"| kind | {kind} |"]
    rows = [
        ("method", method),
        ("rank", inspection.get("rank")),
        ("alpha", inspection.get("alpha")),
        ("target modules", ", ".join((inspection.get("details") or {}).get("target_modules") or []) or None),
        ("quantization", inspection.get("quant")),
        ("task", inspection.get("task_type")),
        ("digest", f"`{info.digest}`"),
        ("signature", f"`{SIGNATURE_FILE}` (OpenSSF model-signing)" if signed else None),
    ]
    lines += [f"| {k} | {v} |" for k, v in rows if v not in (None, "")]
    lines += ["", "## Use it", "", "```bash", f"adapterhub pull {SCHEME}{repo_id}", "```"]
    if kind == "adapter" and inspection.get("format") == "peft" and base:
        auto = _AUTO_CLASSES.get(str(inspection.get("task_type")), "AutoModel")
        lines += [
            "",
            "```python",
            "from peft import PeftModel",
            f"from transformers import {auto}",
            "",
            f'model = PeftModel.from_pretrained({auto}.from_pretrained("{base}"), "{repo_id}")',
            "```",
        ]
    lines += ["", f"`{METADATA_FILE}` holds the registry's metadata and lineage for this version."]
    return "\n".join(lines) + "\n"


def render_card(meta: Mapping[str, Any], body: str, original: bytes | None = None) -> tuple[str, str]:
    """The Hub card and how it was made: ``("generated", text)`` or ``("merged", text)``.

    With an ``original`` card, its front matter wins key by key (tags are
    joined), its text is kept, and ours fills only what it lacks.
    """
    from huggingface_hub import ModelCard, ModelCardData

    if original is None:
        return "generated", f"---\n{ModelCardData(**meta).to_yaml()}\n---\n\n{body}"
    theirs: dict[str, Any] = {}
    text = original.decode("utf-8", errors="replace")
    if text.startswith("---"):
        import yaml

        try:
            card = ModelCard(text, ignore_metadata_errors=True)
        except (yaml.YAMLError, ValueError):  # front matter that is not YAML: the card stays text after ours
            card = None
        if card is not None:
            theirs, text = card.data.to_dict(), card.text
    merged = {**meta, **{k: v for k, v in theirs.items() if v is not None}}
    their_tags = theirs.get("tags") or []
    if isinstance(their_tags, str):
        their_tags = [their_tags]
    merged["tags"] = list(dict.fromkeys([*their_tags, *meta.get("tags", [])]))
    return "merged", f"---\n{ModelCardData(**merged).to_yaml()}\n---\n{text if text.strip() else body}"


# -- the upload plan ----------------------------------------------------------------


@dataclass
class UploadPlan:
    """Everything one push sends, built from the registry alone (no network)."""

    repo: HubRepo
    ref: str
    digest: str
    files: list[tuple[str, Path | bytes]]  # path in the repo -> a blob to read in place, or bytes
    card_mode: str  # generated | merged
    tags: list[str]  # Hub tags to create
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def paths(self) -> list[str]:
        return [p for p, _ in self.files]

    def operations(self, existing: Sequence[str] = ()) -> list[Any]:
        """``CommitOperationAdd`` for every file, and a delete for each file of
        ``existing`` (the repo at the target revision) that this version lacks."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        keep = set(self.paths)
        ops: list[Any] = [
            CommitOperationAdd(path_in_repo=p, path_or_fileobj=src if isinstance(src, bytes) else str(src))
            for p, src in self.files
        ]
        ops += [
            CommitOperationDelete(path_in_repo=p)
            for p in existing
            if p not in keep and not p.split("/")[0].startswith(".git")
        ]
        return ops

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo": self.repo.repo_id, "revision": self.repo.revision or "main", "ref": self.ref,
            "digest": self.digest, "files": self.paths, "tags": self.tags, "card": self.card_mode,
        }


def _latest_signature(reg: Registry, info: VersionInfo, kind: str) -> tuple[dict[str, Any], bytes] | None:
    if kind == "model":
        # A signature by a trusted key when there is one, else the newest.
        from adapterhub.trust.gate import _preferred_signature

        blob = _preferred_signature(reg, info)
        rows = [r for r in reg.signatures(info.digest, kind="model") if r["blob"] == blob]
    else:
        rows = reg.signatures(info.digest, kind=kind)
    if not rows:
        return None
    return rows[0], reg.read_signature(rows[0]["blob"])


def plan_push(reg: Registry, ref: str, target: str | HubRepo) -> UploadPlan:
    """What ``push(reg, ref, target)`` uploads: files, card, metadata and tags."""
    from adapterhub import __version__

    repo = parse_url(target) if isinstance(target, str) else target
    info = reg.resolve(ref)
    files = reg.files(ref)
    paths = {e.path for e, _ in files}
    clash = sorted(paths & set(RESERVED))
    if clash:
        raise ConflictError(
            f"{info.name}:{info.version} has a file named {clash[0]}, which the Hub remote uses for itself",
            hint=f"rename it in the artifact; {', '.join(RESERVED)} are reserved on hf:// remotes",
        )
    inspection = reg.index.inspection(info.digest)
    sig = _latest_signature(reg, info, "model")
    prov = _latest_signature(reg, info, "provenance")
    original = None
    if CARD_FILE in paths:
        blob = next(p for e, p in files if e.path == CARD_FILE)
        original = blob.read_bytes()
        if hashlib.sha256(original).hexdigest() != next(e.sha256 for e, _ in files if e.path == CARD_FILE):
            raise IntegrityError(f"{info.name}:{info.version}: the stored {CARD_FILE} is corrupt", hint="run `adapterhub fsck`")
    mode, card = render_card(card_metadata(inspection), _card_body(info, inspection, repo.repo_id, sig is not None), original)
    lineage = reg.index.parents(info.digest)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool": f"adapterhub {__version__}",
        "name": info.name,
        "version": info.version,
        "digest": info.digest,
        "description": info.description,
        "created_at": info.created_at,
        "registry_tags": [t for t in info.tags if t != "latest"],
        "files": [e.to_dict() for e, _ in files],
        "inspection": inspection,
        "lineage": [{"parent": p["digest"], "relation": p["relation"], "recipe": p["recipe"]} for p in lineage],
        "card": {"file": CARD_FILE, "mode": mode, "original": _encode(original) if original is not None else None},
        "signature": _sig_meta(SIGNATURE_FILE, sig),
        "provenance": _sig_meta(PROVENANCE_FILE, prov),
    }
    out: list[tuple[str, Path | bytes]] = [(e.path, p) for e, p in files if e.path != CARD_FILE]
    out.append((CARD_FILE, card.encode("utf-8")))
    out.append((METADATA_FILE, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode("utf-8")))
    if sig is not None:
        out.append((SIGNATURE_FILE, sig[1]))
    if prov is not None:
        out.append((PROVENANCE_FILE, prov[1]))
    out.sort(key=lambda f: f[0])
    return UploadPlan(repo, f"{info.name}:{info.version}", info.digest, out, mode, [version_tag(info.version)], meta)


def _encode(data: bytes) -> dict[str, Any]:
    entry: dict[str, Any] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    try:
        entry.update(encoding="utf-8", data=data.decode("utf-8"))
    except UnicodeDecodeError:
        entry.update(encoding="base64", data=base64.b64encode(data).decode("ascii"))
    return entry


def _decode(entry: Any) -> bytes:
    """The original card bytes from ``adapterhub.json``, checked against their sha256."""
    try:
        data = entry["data"]
        raw = base64.b64decode(data, validate=True) if entry["encoding"] == "base64" else data.encode("utf-8")
        ok = hashlib.sha256(raw).hexdigest() == entry["sha256"]
    except (KeyError, TypeError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise InvalidArtifactError(f"{METADATA_FILE}: the stored original {CARD_FILE} is malformed or does not match its sha256")
    return raw


def _sig_meta(file: str, sig: tuple[dict[str, Any], bytes] | None) -> dict[str, Any] | None:
    if sig is None:
        return None
    return {"file": file, "key_id": sig[0]["key_id"], "sha256": sig[0]["blob"]}


# -- errors -------------------------------------------------------------------------


def _offline() -> bool:
    """``HF_HUB_OFFLINE`` read now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().upper() in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def _cache_dir() -> str | None:
    """The HF cache location read now, not at huggingface_hub's import time."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _is_network_error(e: BaseException) -> bool:
    """No connection, DNS failure or timeout, from whichever HTTP client huggingface_hub uses."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(e, (OfflineModeIsEnabled, ConnectionError, TimeoutError)):
        return True
    names = {c.__name__ for c in type(e).__mro__}
    module = type(e).__module__.split(".")[0]
    return module.startswith(("httpx", "requests", "urllib3")) and bool(
        names & {"ConnectError", "ConnectTimeout", "TimeoutException", "NetworkError", "ConnectionError", "Timeout", "ReadTimeout"}
    )


def hub_error(e: BaseException, where: str, endpoint: str | None = None) -> AdapterhubError | None:
    """An ``adapterhub.errors`` error for a huggingface_hub exception, or None if it is not one of those."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(e, HFValidationError):
        return InvalidNameError(f"{where}: {str(e).splitlines()[0]}")
    if isinstance(e, GatedRepoError):
        return RemoteAuthError(f"{where} is gated: the Hub refused access", hint=f"accept its conditions on the Hub, then {login}")
    if isinstance(e, RevisionNotFoundError):
        return NotFoundError(f"{where}: no such revision on the Hub", hint="check the branch, tag or commit after @")
    if isinstance(e, RepositoryNotFoundError):
        return NotFoundError(
            f"{where}: no such repo on the Hub, or it is private", hint=f"check the name; for a private repo, {login}"
        )
    if isinstance(e, LocalEntryNotFoundError):
        if type(e).__name__ == "IncompleteSnapshotError":  # huggingface_hub >= 1.x knows partial snapshots
            return NotFoundError(
                f"{where} is only partly in the local Hugging Face cache (an interrupted download?)",
                hint="download it again with the network on (unset HF_HUB_OFFLINE)",
            )
        return NotFoundError(
            f"{where} is not in the local Hugging Face cache, and the Hub was not asked or could not be reached",
            hint="unset HF_HUB_OFFLINE (or check the network) to download it, or `hf download` it first",
        )
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if getattr(e, "response", None) is not None else None
        server = (getattr(e, "server_message", None) or "").strip()
        detail = f": {server}" if server else ""
        if status == 401:
            return RemoteAuthError(f"{where}: the Hub did not accept the credentials (401){detail}", hint=login)
        if status == 403:
            return RemoteAuthError(
                f"{where}: the Hub refused the operation (403){detail}",
                hint="the token needs write access to the organisation (a fine-grained or write token)",
            )
        if status == 404:
            return NotFoundError(f"{where}: not found on the Hub (404){detail}")
        if status == 409:
            return ConflictError(f"{where}: the Hub reports a conflict (409){detail}")
        return RemoteError(f"{where}: the Hub answered {status}{detail}", hint="retry later")
    if _is_network_error(e):
        return RemoteError(
            f"cannot reach the Hub at {endpoint or os.environ.get('HF_ENDPOINT') or DEFAULT_ENDPOINT} ({type(e).__name__})",
            hint="check the network; an adapter already in the HF cache pulls offline (HF_HUB_OFFLINE=1)",
        )
    return None


def _call(fn: Callable[..., Any], where: str, hub: str | None, /, *args: Any, **kw: Any) -> Any:
    """``fn(*args, **kw)`` with huggingface_hub's exceptions as adapterhub errors (``hub``: the endpoint)."""
    try:
        return fn(*args, **kw)
    except AdapterhubError:
        raise
    except Exception as e:  # mapped below, or re-raised as it was
        mapped = hub_error(e, where, hub)
        if mapped is None:
            raise
        raise mapped from e


def _require_online(what: str) -> None:
    if _offline():
        raise RemoteError(f"{what} needs the network, and HF_HUB_OFFLINE is set", hint="unset HF_HUB_OFFLINE")


# -- push ---------------------------------------------------------------------------


def push(
    registry: Registry,
    ref: str,
    target: str,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Upload ``ref`` to ``hf://org/repo[@revision]`` as one commit, then tag it ``v<version>``.

    Pushing a version whose tag already holds the same digest is a no-op;
    a tag holding other content is a ``ConflictError`` (Hub tags, like
    versions, are not moved). Upload progress is huggingface_hub's own.
    """
    from huggingface_hub import HfApi

    repo = parse_url(target)
    if repo.revision and re.fullmatch(r"[0-9a-f]{40}", repo.revision):
        raise InvalidNameError(f"{target}: a push goes to a branch, not to a commit", hint="hf://org/repo or hf://org/repo@BRANCH")
    plan = plan_push(registry, ref, repo)  # checks the artifact before any network call
    _require_online("pushing to the Hub")
    api = HfApi(endpoint=endpoint, token=token)
    where = repo.url
    url = _call(api.create_repo, where, endpoint, repo.repo_id, repo_type="model", exist_ok=True)
    refs = _call(api.list_repo_refs, where, endpoint, repo.repo_id)
    branch = repo.revision or "main"
    if branch in {t.name for t in refs.tags}:
        raise ConflictError(f"{where}: {branch} is a tag on the Hub; a push goes to a branch")
    tag = plan.tags[0]
    existing_tag = next((t for t in refs.tags if t.name == tag), None)
    result = {**plan.to_dict(), "url": str(url).rstrip("/") if url else f"{endpoint or DEFAULT_ENDPOINT}/{repo.repo_id}"}
    if existing_tag is not None:
        there = _remote_metadata(api, repo.repo_id, tag, where, endpoint)
        if there.get("digest") != plan.digest:
            seen = f" ({str(there['digest'])[:19]}…)" if there.get("digest") else ""
            raise ConflictError(
                f"{where} already has tag {tag} with other content{seen}",
                hint="Hub tags follow registry versions and are not moved; push another version",
            )
        return {**result, "commit": existing_tag.target_commit, "created": False}
    if branch != "main" and branch not in {b.name for b in refs.branches}:
        _call(api.create_branch, where, endpoint, repo.repo_id, branch=branch, exist_ok=True)
    current = _call(api.list_repo_files, where, endpoint, repo.repo_id, revision=branch)
    info = _call(
        api.create_commit, where, endpoint, repo.repo_id, plan.operations(current),
        commit_message=f"adapterhub push {plan.ref}",
        commit_description=f"Artifact digest {plan.digest}; see {METADATA_FILE}.",
        revision=branch,
    )
    commit = info.oid
    _call(api.create_tag, where, endpoint, repo.repo_id, tag=tag, revision=commit,
          tag_message=f"{plan.ref} {plan.digest}")
    return {**result, "commit": commit, "created": True}


def _remote_metadata(api: Any, repo_id: str, revision: str, where: str, endpoint: str | None) -> dict[str, Any]:
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = _call(api.hf_hub_download, where, endpoint, repo_id, METADATA_FILE, revision=revision, cache_dir=_cache_dir())
    except (NotFoundError, EntryNotFoundError):
        return {}
    try:
        return _read_metadata(Path(path))
    except InvalidArtifactError:  # a tag someone made by other means
        return {}


# -- pull ---------------------------------------------------------------------------


# adapterhub.json holds names, the file list, the inspection and the original
# card: far less than this, which bounds what a hostile repo makes a pull read.
METADATA_LIMIT = 16 << 20


def _read_metadata(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > METADATA_LIMIT:
            raise InvalidArtifactError(f"{METADATA_FILE} is larger than {METADATA_LIMIT >> 20} MiB",
                                       hint="this is not a repo adapterhub pushed")
        meta = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidArtifactError(f"{METADATA_FILE} is not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InvalidArtifactError(f"{METADATA_FILE} is not adapterhub metadata (format is not {FORMAT!r})")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
        raise InvalidArtifactError(
            f"{METADATA_FILE} has format version {meta.get('format_version')!r}; this adapterhub reads up to {FORMAT_VERSION}",
            hint="upgrade adapterhub",
        )
    return meta


def _snapshot(repo: HubRepo, token: str | None, endpoint: str | None) -> tuple[Path, bool]:
    """The repo's files in the HF cache, downloading what is missing: (snapshot dir, offline)."""
    from huggingface_hub import HfApi, snapshot_download

    offline = _offline()
    if not offline:
        try:
            # Asked here, not only inside snapshot_download, to know whether the
            # Hub answered (snapshot_download falls back to the cache silently)
            # and to report 401/403/404 instead of a stale cached copy.
            HfApi(endpoint=endpoint, token=token).repo_info(repo.repo_id, revision=repo.revision)
        except Exception as e:  # a network error falls back to the cache; others are mapped
            if not _is_network_error(e):
                mapped = hub_error(e, repo.url, endpoint)
                if mapped is None:
                    raise
                raise mapped from e
            offline = True
    # The branch or tag name, not the commit just resolved: snapshot_download
    # then records refs/<revision> in the cache, which a later offline pull needs.
    path = _call(
        snapshot_download, repo.url, endpoint, repo.repo_id, revision=repo.revision, cache_dir=_cache_dir(),
        local_files_only=offline, token=token, endpoint=endpoint,
    )
    return Path(path), offline


def _stage(snap: Path, staging: Path, meta: dict[str, Any] | None, progress: Any, label: str) -> dict[str, str]:
    """Copy the artifact's files out of a snapshot, hashing them on the way:
    what the push added is left out and the original card put back.

    Returns relpath -> sha256. The copies are private to the import, so the
    registry can take them by hard link without sharing an inode with the
    HF cache.
    """
    from adapterhub.manifest import IGNORED_NAMES, check_relpath
    from adapterhub.registry.blobs import copy_durably

    picked: list[tuple[str, Path]] = []
    cache_root = snap.resolve().parents[2]  # <cache>/models--org--repo/snapshots/<commit>
    card = (meta or {}).get("card") or {}
    if not isinstance(card, dict):
        raise InvalidArtifactError(f"{METADATA_FILE}: the card entry is not an object")
    # card["file"] is never used as a path: the original is restored as CARD_FILE.
    staging.mkdir(parents=True)
    for dirpath, dirnames, filenames in os.walk(snap):
        dirnames[:] = sorted(d for d in dirnames if d not in IGNORED_NAMES)
        rel_dir = Path(dirpath).relative_to(snap).as_posix()
        for fname in sorted(filenames):
            rel = fname if rel_dir == "." else f"{rel_dir}/{fname}"
            if fname in IGNORED_NAMES or fname.endswith(".incomplete") or (meta is not None and rel in RESERVED):
                continue
            if rel == CARD_FILE and meta is not None and card.get("mode") in ("generated", "merged"):
                continue  # the card the push wrote; the original (if any) is restored below
            real = Path(dirpath, fname).resolve()
            if cache_root not in real.parents:
                raise InvalidArtifactError(f"{rel} in the cached snapshot points outside the Hugging Face cache ({real})")
            picked.append((check_relpath(rel), real))
    digests: dict[str, str] = {}
    bar = progress(f"importing {label}", sum(os.stat(r).st_size for _, r in picked))
    try:
        for rel, real in picked:
            dst = staging / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            digests[rel] = copy_durably(real, dst, bar.update)
    finally:
        bar.close()
    if meta is not None and card.get("mode") == "merged":
        if card.get("original") is None:
            raise InvalidArtifactError(f"{METADATA_FILE}: the card was merged, but the original is missing")
        raw = _decode(card["original"])
        (staging / CARD_FILE).write_bytes(raw)
        digests[CARD_FILE] = hashlib.sha256(raw).hexdigest()
    return digests


def _check_provenance(
    reg: Registry, raw: bytes, digest: str, namespace: str, lineage: list[dict[str, Any]], *, trusted: bool
) -> str:
    """Check a provenance bundle before import (the registry does not hold the lineage yet).

    Always: its structure, subject and attested inputs. With ``trusted``, also
    its signature by a key trusted for ``namespace``. Returns the key id.
    """
    from adapterhub.trust import policy
    from adapterhub.trust.provenance import PREDICATE_TYPE
    from adapterhub.trust.signing import dsse_verify, parse_bundle

    b = parse_bundle(raw, "provenance attestation")
    if b.predicate_type != PREDICATE_TYPE:
        raise TrustError(f"{PROVENANCE_FILE} is not a provenance attestation (predicate type {b.predicate_type})")
    if b.subject_digest != digest:
        raise TrustError(f"{PROVENANCE_FILE} is for another artifact ({b.subject_digest[:19]}…)")
    claimed = sorted(
        (str(i.get("relation")), str(i.get("digest"))) for i in b.statement["predicate"].get("inputs") or [] if isinstance(i, dict)
    )
    if claimed != sorted((str(p["relation"]), str(p["parent"])) for p in lineage):
        raise TrustError(f"{PROVENANCE_FILE}: the attested inputs differ from the lineage in {METADATA_FILE}")
    if trusted:
        tk = policy.lookup(reg, b.key_hint)
        if tk is None:
            raise TrustError(f"{PROVENANCE_FILE} is signed by key {b.key_hint[:16]}…, which is not trusted")
        problem = tk.problem(namespace)
        if problem:
            raise TrustError(f"{PROVENANCE_FILE}: {problem}")
        dsse_verify(b, tk.public_key.encode(), "provenance attestation")
    return b.key_hint


def pull(
    registry: Registry,
    source: str,
    *,
    name: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    progress: Any = None,
    require_signature: bool = False,
    require_provenance: bool = False,
) -> dict[str, Any]:
    """Import ``hf://org/repo[@revision]`` into the registry.

    The repo comes through huggingface_hub's cache: with ``HF_HUB_OFFLINE=1``,
    or when the endpoint cannot be reached, a snapshot already cached is
    imported with no network. ``name`` is ``NAME[:VERSION]``; by default the
    name comes from the repo id and the version from ``adapterhub.json``.
    Signatures are checked against the trust policy before anything is stored:
    a refused pull leaves nothing in the registry.
    """
    from adapterhub.trust import policy
    from adapterhub.fsutil import remove_stale_staging, staging_path
    from adapterhub.inspect import inspect_path
    from adapterhub.manifest import FileEntry, Manifest
    from adapterhub.trust.provenance import DERIVED_KINDS
    from adapterhub.refs import parse_target
    from adapterhub.trust.signing import check_bundle, parse_bundle
    from adapterhub.registry.registry import _no_progress

    from adapterhub.registry.remotes import check_lineage, check_text

    repo = parse_url(source)
    target_name, target_version = parse_target(name) if name else (name_for(repo.repo_id), None)
    snap, offline = _snapshot(repo, token, endpoint)
    meta = _read_metadata(snap / METADATA_FILE) if (snap / METADATA_FILE).is_file() else None
    warnings: list[str] = []
    # Staged in the registry home (same filesystem: the blobs take the copies
    # by hard link); a killed import leaves a dir the next one removes.
    remove_stale_staging(registry.home / "hf-import")
    tmp = staging_path(registry.home / "hf-import")
    tmp.mkdir()
    try:
        staging = tmp / target_name.split("/")[-1]
        digests = _stage(snap, staging, meta, progress or _no_progress, repo.repo_id)
        manifest = Manifest.from_entries(
            FileEntry(rel, os.stat(staging / rel).st_size, sha) for rel, sha in digests.items()
        )
        digest = manifest.digest
        ins = inspect_path(staging)  # refuses what is not an artifact before any trust check
        matches = meta is not None and meta.get("digest") == digest
        if meta is not None and not matches:
            warnings.append(
                f"the files on the Hub hash to {digest[:19]}…, not to the digest {str(meta.get('digest'))[:19]}… "
                f"recorded in {METADATA_FILE}: they were changed after the push, so its lineage is not imported"
            )
        version = target_version or (meta.get("version") if matches and meta else None)
        if version is not None and not isinstance(version, str):
            raise InvalidNameError(f"{METADATA_FILE}: the version is not a string")
        # What the import takes from adapterhub.json (only when the files match its digest), checked first.
        lineage = check_lineage(meta.get("lineage"), METADATA_FILE) if matches and meta else []
        description = check_text(meta.get("description"), "description", METADATA_FILE) if matches and meta else None
        derived = [(p["parent"], p["relation"]) for p in lineage]
        recipe = next((p["recipe"] for p in lineage if p.get("recipe")), None)

        sig_raw = (snap / SIGNATURE_FILE).read_bytes() if (snap / SIGNATURE_FILE).is_file() else None
        prov_raw = (snap / PROVENANCE_FILE).read_bytes() if meta is not None and (snap / PROVENANCE_FILE).is_file() else None
        rules = policy.required(registry, target_name)
        need_sig = require_signature or "require-signature" in rules
        need_prov = require_provenance or "require-provenance" in rules
        outcome: dict[str, Any] = {"signature_required": need_sig, "provenance_required": need_prov}
        namespace = policy.namespace_of(target_name)
        label = f"{repo.url} ({digest[:19]}…)"
        sig_key = None
        if sig_raw is not None:
            try:
                b = parse_bundle(sig_raw)
                if b.subject_digest == digest:
                    sig_key = b.key_hint
                else:
                    warnings.append(f"{SIGNATURE_FILE} is for another artifact ({b.subject_digest[:19]}…); it is not stored")
            except TrustError as e:
                warnings.append(f"{SIGNATURE_FILE} is not stored: {e}")
        if need_sig:
            if sig_raw is None:
                raise TrustError(f"{label} is not signed (no {SIGNATURE_FILE}), and the trust policy requires a signature")
            check = check_bundle(sig_raw, staging, reg=registry, expected_digest=digest, namespace=namespace)
            if not check.ok:
                raise TrustError(f"{label}: no valid signature by a trusted key ({check.reason})")
            outcome["signature"] = {"verified": True, "key_id": check.key_id, "key_name": check.key_name}
        prov_key = None
        if prov_raw is not None and matches:
            # Stored when it is about these files and this lineage; its key is
            # checked now only if the policy asks, and otherwise when it is used.
            try:
                prov_key = _check_provenance(registry, prov_raw, digest, namespace, lineage, trusted=need_prov)
                if need_prov:
                    outcome["provenance"] = "verified"
            except TrustError as e:
                if need_prov:
                    raise TrustError(f"{label}: {e}") from None
                warnings.append(f"{PROVENANCE_FILE} is not stored: {e}")
        elif need_prov and (derived or ins.kind in DERIVED_KINDS):
            raise TrustError(f"{label} is a derived artifact without verifiable provenance, and the trust policy requires it")

        target = f"{target_name}:{version}" if version else target_name
        try:
            res = registry.push(staging, target, description=description,
                                derived_from=derived, recipe=recipe, progress=progress, verified=digests,
                                inspection=ins)
        except ConflictError as e:
            raise ConflictError(str(e), hint="pass --name NAME:VERSION to import it under another version") from None
        try:
            if res.digest != digest:  # the staged files changed under us
                raise IntegrityError(f"{repo.url}: the files changed while they were imported")
            if sig_key is not None and sig_raw is not None:
                registry.add_signature(res.digest, sig_raw, sig_key, kind="model")
                outcome["signature_stored"] = True
            if prov_key is not None and prov_raw is not None:
                registry.add_signature(res.digest, prov_raw, prov_key, kind="provenance")
        except BaseException:
            if res.created:  # nothing half-imported
                registry.execute_rm(registry.plan_rm(res.ref))
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        **res.to_dict(),
        "source": repo.url,
        "repo": repo.repo_id,
        "revision": repo.revision or "main",
        "commit": snap.name,
        "offline": offline,
        "files": [f.to_dict() for f in manifest.files],
        "digest_matches_metadata": matches if meta is not None else None,
        "origin": {"name": meta.get("name"), "version": meta.get("version")} if meta else None,
        "lineage_imported": len(derived),
        "trust": outcome,
        "warnings": [*res.to_dict()["warnings"], *warnings],
    }


# -- search -------------------------------------------------------------------------

# PEFT methods as the card tags spell them (``card_metadata`` lowercases Inspection.method).
_METHODS = ("lora", "dora", "ia3", "adalora", "loha", "lokr", "vera", "oft", "boft", "prompt_tuning",
            "prefix_tuning", "p_tuning", "adaption_prompt", "bottleneck")
_QUANTS = ("nf4", "fp4", "int8", "gptq", "awq")


def model_row(m: Any, endpoint: str | None = None) -> dict[str, Any]:
    """One search result from a huggingface_hub ``ModelInfo`` (the card's metadata, no extra request)."""
    tags = [str(t) for t in (m.tags or [])]
    card = m.card_data.to_dict() if getattr(m, "card_data", None) is not None else {}
    card_tags = [str(t) for t in card.get("tags") or []] if isinstance(card.get("tags"), list) else []
    all_tags = list(dict.fromkeys([*card_tags, *tags]))
    rank = next((int(t[5:]) for t in all_tags if re.fullmatch(r"rank-\d{1,6}", t)), None)
    relation = card.get("base_model_relation")
    kind = {"adapter": "adapter", "merged": "merged", "quantized": "quantized"}.get(str(relation)) if relation else None
    if kind is None and "gguf" in all_tags:
        kind = "gguf"
    elif kind is None and (m.library_name == "peft" or "peft" in all_tags):
        kind = "adapter"
    base = card.get("base_model")
    base = base[0] if isinstance(base, list) and base else base
    web = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    modified = getattr(m, "last_modified", None)
    return {
        "repository": m.id,
        "url": f"{SCHEME}{m.id}",
        "revision": getattr(m, "sha", None),
        "name": name_for(m.id),
        "version": None,  # Hub tags (v3, ...) need one more request per repo; `pull` reads adapterhub.json
        "digest": None,
        "tags": all_tags,
        "kind": kind,
        "method": next((t.upper() for t in all_tags if t in _METHODS), None),
        "base_model": base if isinstance(base, str) else None,
        "rank": rank,
        "quant": next((t for t in all_tags if t in _QUANTS), None),
        "size": None,
        "description": None,
        "metadata": {
            "web": f"{web}/{m.id}",
            "library_name": m.library_name or card.get("library_name"),
            "adapterhub": "adapterhub" in all_tags,
            "downloads": getattr(m, "downloads", None),
            "private": getattr(m, "private", None),
            "last_modified": modified.isoformat() if modified else None,
        },
    }


def search(org_url: str, *, token: str | None = None, endpoint: str | None = None) -> list[dict[str, Any]]:
    """Models of an organisation on the Hub (``hf://org``, or ``hf://org/text`` to filter by name).

    Rows carry the columns ``adapterhub search --remote`` filters on (kind,
    method, base model, rank, quant), read from each model card's metadata.
    """
    from huggingface_hub import HfApi

    org, text = parse_org_url(org_url)
    _require_online("searching the Hub")
    api = HfApi(endpoint=endpoint, token=token)

    def listing() -> list[dict[str, Any]]:
        return [model_row(m, endpoint) for m in api.list_models(author=org, search=text, cardData=True)]

    return _call(listing, f"{SCHEME}{org}", endpoint)
