"""A base model that stays on the remote: ``check --base oci://host/ns/name:tag`` or ``--base hf://org/model[@rev]``.

A check needs the base's ``config.json`` and the names, dtypes and shapes of
its weights, not the weights. :func:`fetch_base` lays out a local directory
that inspection reads as the base:

- small files (``config.json``, the shard index, tokenizer and generation
  configs: anything up to :data:`SMALL_FILE`) whole, checked against their digest;
- each ``*.safetensors`` file as its header only: two HTTP Range requests on
  the blob (the 8-byte length, then the header), written into a sparse file of
  the blob's full size, so the header's offsets agree with the file; the few
  bytes of bitsandbytes ``quant_state`` tensors are fetched too;
- nothing else (pickled weights, GGUF files).

For a 7B model in three shards the headers are under 100 kB; with the
tokenizer and the other small files, a few MB instead of 13.5 GB.
On the Hub, huggingface_hub's own header reader (``get_safetensors_metadata``)
does the same through the Hub's HTTP API; the headers are then written from
its answer.

A partial read cannot be checked against the blob's digest: the headers are
what the registry says they are, which is what a check reports on.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import InvalidArtifactError, RemoteError

if TYPE_CHECKING:
    from adapterhub.registry import Registry
    from adapterhub.registry.remotes.oci.client import Client

SMALL_FILE = 32 << 20  # tokenizer.json of a large vocabulary is ~10-20 MB; weights are far bigger
HEADER_LIMIT = 100 << 20  # safetensors' own cap on a header
QUANT_STATE_LIMIT = 1 << 16


@dataclass
class RemoteBase:
    """A remote base laid out locally (headers only); :meth:`close` removes it."""

    url: str
    path: Path
    bytes_transferred: int = 0
    files: list[str] = field(default_factory=list)  # laid out (relpaths)
    headers_only: list[str] = field(default_factory=list)  # of those: safetensors files without their data
    left_out: list[str] = field(default_factory=list)  # files not fetched at all

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def identity(self) -> dict[str, str | None]:
        """How the base is named on its remote: ``ref`` (OCI ``repository:tag``) or ``hub_id`` and ``revision``."""
        from adapterhub.registry.remotes.urls import parse_url

        u = parse_url(self.url)
        if u.scheme == "hf":
            return {"hub_id": u.path, "revision": u.reference}
        return {"ref": f"{u.path}:{u.reference or 'latest'}"}

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "bytes_transferred": self.bytes_transferred, "files": self.files,
                "headers_only": self.headers_only, "left_out": self.left_out}


def is_remote_base(spec: object) -> bool:
    from adapterhub.registry.remotes.urls import is_url

    return isinstance(spec, str) and is_url(spec)


def fetch_base(spec: str, registry: Registry | None = None, *, dest: Path | None = None) -> RemoteBase:
    """Lay out the base at ``spec`` (``oci://...`` or ``hf://org/model[@rev]``) under ``dest`` (a temp dir)."""
    from adapterhub.registry.remotes.urls import parse_url

    u = parse_url(spec)
    path = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="adapterhub-base-"))
    base = RemoteBase(str(u), path)
    try:
        if u.scheme == "oci":
            _oci_base(u, registry, base)
        else:
            _hf_base(u, base)
    except BaseException:
        if dest is None:
            base.close()
        raise
    return base


# -- OCI --------------------------------------------------------------------------------


def _oci_base(u: Any, registry: Registry | None, base: RemoteBase) -> None:
    from adapterhub.registry.remotes.credentials import credentials
    from adapterhub.registry.remotes.dispatch import Endpoint, resolve
    from adapterhub.registry.remotes.oci.client import client_for
    from adapterhub.registry.remotes.oci.media import check_oci_tag, check_repository
    from adapterhub.registry.remotes.oci.plan import plan as make_plan

    ep = resolve(registry, url=str(u)) if registry is not None else Endpoint(u, None, credentials(None, u))
    repo = check_repository(u.path)
    reference = u.reference or "latest"
    if not reference.startswith("sha256:"):
        check_oci_tag(reference)
    client = client_for(ep)
    client.ping()
    plan = make_plan(client, repo, reference, "base")  # reads our config blob, if it is ours
    for rel, hex_, size in plan.files:
        dst = base.path / rel
        if rel.endswith(".safetensors"):
            dst.parent.mkdir(parents=True, exist_ok=True)
            _oci_header(client, repo, "sha256:" + hex_, size, dst)
            base.headers_only.append(rel)
        elif size <= SMALL_FILE:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(client.get_small_blob(repo, "sha256:" + hex_, limit=SMALL_FILE, what=rel))
        else:
            base.left_out.append(rel)
            continue
        base.files.append(rel)
    base.bytes_transferred = client.blob_bytes


def _get_range(client: Client, repo: str, digest: str, start: int, length: int) -> bytes:
    """``length`` bytes of a blob from ``start``, by an HTTP Range request (never the whole blob)."""
    r = client.request("GET", f"/v2/{repo}/blobs/{digest}", ok=(200, 206), repo=repo, stream=True,
                       headers={"Range": f"bytes={start}-{start + length - 1}"})
    what = f"{client.host}/{repo}: bytes {start}-{start + length - 1} of {digest[:19]}…"
    if r.status_code == 206:
        data = client.read_body(r, length, what)
    elif start + length <= 1 << 20:
        # The registry ignored Range: read what is needed from the start, then hang up.
        try:
            data = r.raw.read(start + length, decode_content=True)[start:]
        finally:
            client.watchdog.disarm()
            r.close()
    else:
        client.watchdog.disarm()
        r.close()
        raise RemoteError(f"{client.host} ignores HTTP Range requests: the base's headers cannot be read "
                          "without downloading its weights", hint="check against a local copy of the base")
    client.blob_bytes += len(data)
    if len(data) != length:
        raise InvalidArtifactError(f"{what}: got {len(data)} bytes")
    return data


def _oci_header(client: Client, repo: str, digest: str, size: int, dst: Path) -> None:
    """Write the safetensors header of a blob into a sparse file of its size."""
    if size < 8:
        raise InvalidArtifactError(f"{dst.name}: {size} bytes, too short for a safetensors file")
    head = _get_range(client, repo, digest, 0, 8)
    (n,) = struct.unpack("<Q", head)
    if n > HEADER_LIMIT or 8 + n > size:
        raise InvalidArtifactError(f"{dst.name}: a safetensors header of {n} bytes in a file of {size}")
    header = _get_range(client, repo, digest, 8, n)
    with open(dst, "wb") as f:
        f.write(head + header)
        f.truncate(size)  # sparse: the data stays on the remote
        for start, end in _quant_states(header, dst.name):
            f.seek(8 + n + start)
            f.write(_get_range(client, repo, digest, 8 + n + start, end - start))


def _quant_states(header: bytes, name: str) -> list[tuple[int, int]]:
    """Data ranges of the bitsandbytes ``quant_state`` tensors (a few hundred bytes of JSON each)."""
    from adapterhub.jsonio import loads

    doc = loads(header, what=f"{name}: the safetensors header", max_bytes=HEADER_LIMIT, max_depth=8)
    out = []
    for key, entry in (doc.items() if isinstance(doc, dict) else ()):
        if ".quant_state." not in key or not isinstance(entry, dict):
            continue
        offs = entry.get("data_offsets")
        if (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
                and 0 <= offs[0] <= offs[1] and offs[1] - offs[0] <= QUANT_STATE_LIMIT):
            out.append((offs[0], offs[1]))
    return out


# -- Hugging Face Hub -------------------------------------------------------------------


def _hf_base(u: Any, base: RemoteBase) -> None:
    """Headers from huggingface_hub's ``get_safetensors_metadata``, small files by ``hf_hub_download``.

    The Hub path needs the network (and a token for a gated model); it could
    not be tested against the real Hub where this was written.
    """
    from huggingface_hub import HfApi, get_safetensors_metadata, hf_hub_download

    from adapterhub.registry.remotes.hf.errors import cache_dir, call, require_online
    from adapterhub.registry.remotes.hf.urls import parse_url as parse_hub_url

    repo = parse_hub_url(str(u))
    require_online("reading a base model's headers from the Hub")
    token = os.environ.get("HF_TOKEN") or None
    meta = call(get_safetensors_metadata, repo.url, None, repo.repo_id, revision=repo.revision, token=token)
    info = call(HfApi(token=token).model_info, repo.url, None, repo.repo_id, revision=repo.revision, files_metadata=True)
    sizes = {s.rfilename: s.size for s in (info.siblings or []) if s.size is not None}
    for rel, fmeta in meta.files_metadata.items():
        header = safetensors_header(fmeta)
        size = sizes.get(rel) or 8 + len(header) + max((t.data_offsets[1] for t in fmeta.tensors.values()), default=0)
        dst = base.path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(dst, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            f.truncate(size)
        base.headers_only.append(rel)
        base.files.append(rel)
    for rel, size in sizes.items():
        if rel.endswith(".safetensors") or rel in base.files:
            continue
        if size > SMALL_FILE or not rel.endswith((".json", ".txt", ".model")):
            base.left_out.append(rel)
            continue
        got = call(hf_hub_download, repo.url, None, repo.repo_id, rel, revision=repo.revision, token=token,
                   cache_dir=cache_dir())
        dst = base.path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(got, dst)
        base.files.append(rel)
        base.bytes_transferred += size
    base.bytes_transferred += sum(8 + len(safetensors_header(m)) for m in meta.files_metadata.values())


def safetensors_header(fmeta: Any) -> bytes:
    """The header bytes of a safetensors file from huggingface_hub's ``SafetensorsFileMetadata``."""
    doc: dict[str, Any] = {}
    if fmeta.metadata:
        doc["__metadata__"] = dict(fmeta.metadata)
    for name, t in fmeta.tensors.items():
        doc[name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": list(t.data_offsets)}
    return json.dumps(doc, separators=(",", ":")).encode()
