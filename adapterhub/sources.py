"""Where an input artifact comes from: a path, a registry ref, or the HF cache.

``resolve_source("team/qa-lora@prod")`` gives the artifact's files as a map of
relative path -> real path. Registry artifacts map to their content-addressed
blobs, which converters read in place (memory-mapped), with no copy.

Resolution order for a spec:

1. an existing file or directory;
2. ``hf:ORG/NAME[@REVISION]``, or anything that is not a registry ref but looks
   like a Hub model id: the local Hugging Face cache, read offline through
   ``huggingface_hub.snapshot_download(local_files_only=True)``;
3. a registry ref (``name``, ``name:version``, ``name@tag``, ``name@sha256:…``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import InvalidArtifactError, InvalidNameError, NotFoundError
from adapterhub.manifest import list_files

if TYPE_CHECKING:
    from adapterhub.registry import Registry

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")  # fullmatch: not `$`, which passes "a/b\n"


@dataclass(frozen=True)
class Source:
    spec: str  # what the user typed
    origin: str  # path | registry | hf-cache
    files: dict[str, Path]  # relpath -> real path
    root: Path | None = None  # the directory, when there is one
    ref: str | None = None  # name:version, for registry sources
    digest: str | None = None  # known without hashing (registry sources)
    hub_id: str | None = None
    revision: str | None = None

    def describe(self) -> str:
        if self.ref:
            return f"{self.ref} ({self.digest[:19] if self.digest else ''})"
        if self.hub_id:
            return f"{self.hub_id}@{self.revision or 'main'} (HF cache)"
        return str(self.root)

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "origin": self.origin,
            "ref": self.ref,
            "digest": self.digest,
            "path": str(self.root) if self.root else None,
            "hub_id": self.hub_id,
            "revision": self.revision,
        }


def from_hf_cache(repo_id: str, revision: str | None = None) -> Source:
    """A model already in the local Hugging Face cache, read with no network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    # Read the cache location now, not at huggingface_hub's import time.
    cache_dir = os.environ.get("HF_HUB_CACHE") or (
        os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None
    )
    try:
        path = Path(snapshot_download(repo_id, revision=revision, local_files_only=True, cache_dir=cache_dir))
    except LocalEntryNotFoundError:
        raise NotFoundError(
            f"{repo_id}{'@' + revision if revision else ''} is not in the local Hugging Face cache",
            hint="download it first (hf download ...), or pass a directory or a registry ref",
        ) from None
    return Source(
        spec=f"hf:{repo_id}" + (f"@{revision}" if revision else ""),
        origin="hf-cache",
        files=dict(list_files(path)),
        root=path,
        hub_id=repo_id,
        revision=path.name,
    )


def resolve_source(spec: str | os.PathLike, registry: Registry | None = None, *, revision: str | None = None) -> Source:
    text = os.fspath(spec)
    p = Path(text).expanduser()
    if p.exists():
        return Source(spec=text, origin="path", files=dict(list_files(p)), root=p)
    if text.startswith("hf:"):
        repo, _, rev = text[3:].partition("@")
        return from_hf_cache(repo, rev or revision)
    from adapterhub.refs import Ref

    try:
        ref = Ref.parse(text)
    except InvalidNameError:
        if _HUB_ID.fullmatch(text):
            return from_hf_cache(text, revision)
        raise NotFoundError(f"{text}: no such path, and not a valid registry ref or Hub model id") from None
    if registry is None:
        from adapterhub.registry import Registry

        registry = Registry()
    try:
        info = registry.resolve(ref)
    except NotFoundError:
        if _HUB_ID.fullmatch(text):
            return from_hf_cache(text, revision)
        raise NotFoundError(
            f"{text}: no such path, registry ref or cached Hub model",
            hint="`adapterhub ls` lists the registry",
        ) from None
    files = {e.path: path for e, path in registry.files(ref)}
    return Source(
        spec=text, origin="registry", files=files, ref=f"{info.name}:{info.version}", digest=info.digest
    )


def default_base(adapter: Source) -> tuple[str, str | None]:
    """The base named in the adapter's config: (base_model_name_or_path, revision)."""
    cfg_path = adapter.files.get("adapter_config.json")
    if cfg_path is None:
        raise InvalidArtifactError(f"{adapter.spec} has no adapter_config.json, so --base is needed")
    from adapterhub import jsonio

    cfg = jsonio.read_json(cfg_path, what="adapter_config.json")  # size- and depth-capped; an object
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise InvalidArtifactError("the adapter config names no base model; pass --base")
    return base, cfg.get("revision")


def resolve_base(adapter: Source, base: str | os.PathLike | None, registry: Registry | None = None) -> Source:
    """``base`` as given, or else the base the adapter's config names (at its revision)."""
    if base is not None:
        return resolve_source(base, registry)
    name, rev = default_base(adapter)
    return resolve_source(name, registry, revision=rev)
