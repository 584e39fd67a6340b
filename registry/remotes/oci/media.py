"""OCI media types, names, limits and settings: what the other ``oci`` modules share.

An artifact is one OCI image manifest:

- every file is a layer blob (media type ``application/vnd.adapterhub.file.v1``)
  whose ``org.opencontainers.image.title`` annotation is its relative path;
- the config blob (``application/vnd.adapterhub.artifact.config.v1+json``) holds
  our metadata: name, version, tags, description, the inspection, the file
  list and the lineage rows;
- ``artifactType`` says what it is (``application/vnd.adapterhub.adapter.v1``,
  ``.merged.v1``, ``.quantized.v1``, ``.checkpoint.v1``, ``.gguf.v1``) and
  annotations carry the base model, method, rank and quantization for tools
  that read manifests only.

Signatures are OCI 1.1 referrers of that manifest (a manifest whose
``subject`` is it). A registry without the referrers API (Distribution 2.8)
gets the fallback: an image index under the tag ``sha256-<hex>`` listing them.
"""

from __future__ import annotations

import hashlib
import os
import re

from adapterhub.errors import InvalidNameError

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST_TYPES = (
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
CONFIG_TYPE = "application/vnd.adapterhub.artifact.config.v1+json"
FILE_TYPE = "application/vnd.adapterhub.file.v1"
ARTIFACT_TYPES = {
    kind: f"application/vnd.adapterhub.{kind}.v1" for kind in ("adapter", "merged", "quantized", "checkpoint", "gguf")
}
SIGNATURE_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
TITLE = "org.opencontainers.image.title"
A = "dev.adapterhub."  # our annotation prefix
IMAGE_CONFIG_TYPES = ("application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json")

# Repository path components and tags as the distribution spec defines them.
REPO_COMPONENT_RE = re.compile(r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*")
OCI_TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
SHA256_RE = re.compile(r"sha256:[0-9a-f]{64}")

READ_CHUNK = 1 << 20

# The distribution spec asks registries to take manifests up to 4 MiB; a
# bigger one is not read into memory.
MANIFEST_LIMIT = 4 << 20

# Our config is metadata (names, inspection, file list): a few MiB is far more
# than any artifact needs, and what a hostile registry may make a pull read.
CONFIG_LIMIT = 4 << 20

# A signature or provenance bundle is a few KiB; a bigger referrer is skipped.
SIGNATURE_LIMIT = 1 << 20

# A page of the catalog or of a tag list (n=1000 names) is tens of kB.
LISTING_LIMIT = 8 << 20


def env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def chunk_size() -> int:
    """Files this big or bigger go up in PATCH chunks of this size (``ADAPTERHUB_OCI_CHUNK_MB``)."""
    return max(1, int(env_float("ADAPTERHUB_OCI_CHUNK_MB", 64) * 2**20))


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_repository(repo: str) -> str:
    if len(repo) > 255 or not all(REPO_COMPONENT_RE.fullmatch(c) for c in repo.split("/")):
        raise InvalidNameError(
            f"{repo!r} is not a valid OCI repository name",
            hint="OCI names are lowercase letters and digits, separated by single '.', '_', '__' or runs of '-'; "
            "pull or push under another name (--name)",
        )
    return repo


def check_oci_tag(tag: str, what: str = "tag") -> str:
    if not OCI_TAG_RE.fullmatch(tag):
        raise InvalidNameError(
            f"{what} {tag!r} cannot be an OCI tag",
            hint="OCI tags are letters, digits, '.', '_' and '-' (up to 128), so a version such as 1.0+build cannot be pushed",
        )
    return tag


def fallback_tag(digest: str) -> str:
    return digest.replace(":", "-")
