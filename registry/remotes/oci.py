"""Push, pull and search adapterhub artifacts on OCI registries (distribution spec v1.1).

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

Why plain ``requests`` and not the ``oras`` client (0.2.x): its download
writes a blob without checking its digest and cannot resume with HTTP Range,
its monolithic upload reads the whole file into memory, and its token flow
and retries would still need wrapping to give our errors and exit codes.
Those are the parts that matter here, so this module speaks the distribution
API itself, in about as much code as wrapping oras would take. The tests use
the ``oras`` client as a third-party pusher.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import mmap
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

from adapterhub.errors import (
    AdapterhubError,
    ConflictError,
    IntegrityError,
    InvalidArtifactError,
    InvalidNameError,
    NotFoundError,
    RemoteAuthError,
    RemoteError,
    StorageError,
    TrustError,
)
from adapterhub.fsutil import DIRECT_ALIGN, clear_direct, open_direct

if TYPE_CHECKING:
    import requests

    from adapterhub.registry import Registry

    from adapterhub.registry.remotes import Endpoint

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
_REPO_COMPONENT = re.compile(r"^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*$")
_OCI_TAG = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$")

READ_CHUNK = 1 << 20


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def chunk_size() -> int:
    """Files this big or bigger go up in PATCH chunks of this size (``ADAPTERHUB_OCI_CHUNK_MB``)."""
    return max(1, int(_env_float("ADAPTERHUB_OCI_CHUNK_MB", 64) * 2**20))


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_repository(repo: str) -> str:
    if len(repo) > 255 or not all(_REPO_COMPONENT.match(c) for c in repo.split("/")):
        raise InvalidNameError(
            f"{repo!r} is not a valid OCI repository name",
            hint="OCI names are lowercase letters and digits, separated by single '.', '_', '__' or runs of '-'; "
            "pull or push under another name (--name)",
        )
    return repo


def check_oci_tag(tag: str, what: str = "tag") -> str:
    if not _OCI_TAG.match(tag):
        raise InvalidNameError(
            f"{what} {tag!r} cannot be an OCI tag",
            hint="OCI tags are letters, digits, '.', '_' and '-' (up to 128), so a version such as 1.0+build cannot be pushed",
        )
    return tag


# -- HTTP ------------------------------------------------------------------------------


class _Retry(Exception):
    """The request should be sent again (after auth was set up)."""


def _errors_of(resp: requests.Response) -> tuple[str, str]:
    try:
        doc = resp.json()
        errs = doc.get("errors") or []
        if errs and isinstance(errs[0], dict):
            return str(errs[0].get("code", "")), str(errs[0].get("message", ""))
    except (ValueError, AttributeError):
        pass
    return "", resp.text.strip()[:200]


class Client:
    """A small OCI distribution client over ``requests``: auth, bounded retries, errors mapped."""

    def __init__(self, host: str, *, insecure: bool = False, loopback: bool = False, username: str | None = None,
                 password: str | None = None, token: str | None = None) -> None:
        import requests

        self.host = host
        self.base = f"{'http' if insecure or loopback else 'https'}://{host}"
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "adapterhub"
        self.username, self.password, self.token = username, password, token
        self.timeout = _env_float("ADAPTERHUB_REMOTE_TIMEOUT", 30.0)
        self.retries = int(_env_float("ADAPTERHUB_REMOTE_RETRIES", 3))
        self._auth: dict[str, str] = {}  # scope (or "") -> Authorization header value
        self._basic = False
        self.requests = 0
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    # -- requests -------------------------------------------------------------------

    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.base + path

    def request(self, method: str, path: str, *, ok: tuple[int, ...] = (200,), headers: dict[str, str] | None = None,
                data: Any = None, stream: bool = False, repo: str | None = None, retry: bool = True,
                allow: tuple[int, ...] = ()) -> requests.Response:
        """Send with bounded retries on connection errors and 5xx/429; map errors to ours.

        ``allow`` lists statuses returned as they are (404 for HEAD, ...).
        A body that is not bytes (a streamed file) is never resent here.
        """
        import requests

        resend = retry and (data is None or isinstance(data, (bytes, bytearray)))
        attempts = (self.retries + 1) if resend else 1
        last: Exception | None = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(5.0, 0.2 * 2 ** (attempt - 1)))
            try:
                resp = self.session.request(method, self.url(path), headers=headers, data=data, stream=stream,
                                            timeout=(self.timeout, self.timeout), allow_redirects=True)
                self.requests += 1
            except requests.ConnectionError as e:
                last = e
                continue
            except requests.Timeout as e:
                last = e
                continue
            except requests.RequestException as e:
                raise RemoteError(f"{method} {self.url(path)} failed: {e}") from None
            if resp.status_code == 401:
                resp.close()
                if self._authenticate(resp, repo):
                    if not resend:
                        raise _Retry()
                    return self.request(method, path, ok=ok, headers=headers, data=data, stream=stream, repo=repo,
                                        retry=retry, allow=allow)
                self._auth_failed(resp)
            if resp.status_code in ok or resp.status_code in allow:
                return resp
            if resp.status_code >= 500 or resp.status_code == 429:
                last = RemoteError(f"{self.host} answered {resp.status_code} to {method} {urlsplit(resp.url).path}: "
                                   f"{_errors_of(resp)[1]}")
                resp.close()
                continue
            self._raise(resp, method, repo)
        if isinstance(last, RemoteError):
            raise RemoteError(f"{last} (after {attempts} attempts)", hint="the registry is failing; retry later")
        raise RemoteError(
            f"cannot reach the registry at {self.base} ({type(last).__name__}, {attempts} attempts)",
            hint="check the URL and that the registry is up; ADAPTERHUB_REMOTE_TIMEOUT and ADAPTERHUB_REMOTE_RETRIES tune the wait",
        )

    def _raise(self, resp: requests.Response, method: str, repo: str | None) -> None:
        code, msg = _errors_of(resp)
        where = f"{self.host}/{repo}" if repo else self.host
        st = resp.status_code
        resp.close()
        if st == 403 or code == "DENIED":
            raise RemoteAuthError(f"{where}: access denied ({msg or st})",
                                  hint="these credentials may not do this; check the user's rights on the registry")
        if code == "NAME_INVALID" or (st == 404 and code == "" and "page not found" in msg):
            raise InvalidNameError(f"the registry refuses the repository name {repo!r}: {msg}")
        if code in ("NAME_UNKNOWN", "MANIFEST_UNKNOWN", "BLOB_UNKNOWN") or st == 404:
            raise NotFoundError(f"{where}: not found ({msg or code or st})")
        if code in ("DIGEST_INVALID", "SIZE_INVALID", "BLOB_UPLOAD_INVALID"):
            raise IntegrityError(f"{where}: the registry rejected the upload: {code} {msg}",
                                 hint="a local blob may be damaged; run `adapterhub fsck`")
        if code == "TAG_INVALID":
            raise InvalidNameError(f"{where}: invalid tag: {msg}")
        raise RemoteError(f"{where}: {method} failed with {st} {code} {msg}".rstrip())

    def _auth_failed(self, resp: requests.Response) -> None:
        if self.username or self.token:
            raise RemoteAuthError(
                f"authentication to {self.host} failed: the registry refused the "
                + ("username or password" if self.username else "token"),
                hint="check them, then `adapterhub remote add NAME URL --replace --username U --password-stdin`",
            )
        raise RemoteAuthError(
            f"{self.host} requires authentication",
            hint="`adapterhub remote add NAME URL --username U --password-stdin`, "
            "ADAPTERHUB_REMOTE_USERNAME/ADAPTERHUB_REMOTE_PASSWORD, or `docker login`",
        )

    def _authenticate(self, resp: requests.Response, repo: str | None) -> bool:
        """Answer a 401 challenge: Basic with the credentials, or a Bearer token from the realm."""
        if self.token:
            return False  # a token is sent as it is; a refusal is final
        challenge = resp.headers.get("WWW-Authenticate", "")
        scheme, _, params_text = challenge.partition(" ")
        params = dict(re.findall(r'(\w+)="([^"]*)"', params_text))
        if scheme.lower() == "basic":
            if not self.username or self._basic:
                return False
            self._basic = True
            self.session.auth = (self.username, self.password or "")
            return True
        if scheme.lower() == "bearer" and params.get("realm"):
            scope = params.get("scope", "")
            if scope in self._auth:
                if self.session.headers.get("Authorization") == self._auth[scope]:
                    return False  # the token for this scope was refused
                self.session.headers["Authorization"] = self._auth[scope]  # back to this scope's token
                return True
            import requests

            q = {k: v for k, v in (("service", params.get("service")), ("scope", scope)) if v}
            auth = (self.username, self.password or "") if self.username else None
            try:
                r = requests.get(params["realm"], params=q, auth=auth, timeout=(self.timeout, self.timeout))
            except requests.RequestException as e:
                raise RemoteError(f"cannot reach the token service {params['realm']}: {e}") from None
            if r.status_code != 200:
                return False
            tok = (r.json() or {}).get("token") or (r.json() or {}).get("access_token")
            if not tok:
                return False
            self._auth[scope] = f"Bearer {tok}"
            self.session.headers["Authorization"] = f"Bearer {tok}"
            return True
        return False

    def ping(self) -> None:
        """``GET /v2/``: checks that this is a registry, and sets up auth before any upload."""
        self.request("GET", "/v2/", ok=(200,))

    # -- blobs ----------------------------------------------------------------------

    def has_blob(self, repo: str, digest: str) -> bool:
        r = self.request("HEAD", f"/v2/{repo}/blobs/{digest}", allow=(404,), repo=repo)
        return r.status_code == 200

    def _location(self, resp: requests.Response) -> str:
        loc = resp.headers.get("Location")
        if not loc:
            raise RemoteError(f"{self.host} started an upload without a Location header")
        return urljoin(resp.url or self.base, loc)

    @staticmethod
    def _with_digest(url: str, digest: str) -> str:
        parts = urlsplit(url)
        query = (parts.query + "&" if parts.query else "") + urlencode({"digest": digest})
        return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))

    def upload_bytes(self, repo: str, data: bytes, digest: str) -> None:
        r = self.request("POST", f"/v2/{repo}/blobs/uploads/", ok=(202,), repo=repo, headers={"Content-Length": "0"})
        loc = self._location(r)
        self.request("PUT", self._with_digest(loc, digest), ok=(201,), data=data, repo=repo,
                     headers={"Content-Type": "application/octet-stream"})

    def upload_file(self, repo: str, path: Path, digest: str, size: int, progress: Any = None) -> None:
        """Monolithic PUT below :func:`chunk_size`, PATCH chunks above; a broken upload restarts, bounded."""
        for attempt in range(self.retries + 1):
            try:
                self._upload_file_once(repo, path, digest, size, progress)
                return
            except _Retry:
                continue
            except RemoteError as e:
                if attempt == self.retries or isinstance(e, RemoteAuthError) or "cannot reach" not in str(e):
                    raise
        raise RemoteError(f"upload of {path.name} to {self.host}/{repo} kept failing")

    def _upload_file_once(self, repo: str, path: Path, digest: str, size: int, progress: Any) -> None:
        r = self.request("POST", f"/v2/{repo}/blobs/uploads/", ok=(202,), repo=repo, headers={"Content-Length": "0"})
        loc = self._location(r)
        chunk = chunk_size()
        if size < chunk:
            self.request("PUT", self._with_digest(loc, digest), ok=(201,), data=_FileSlice(path, 0, size, progress),
                         repo=repo, headers={"Content-Type": "application/octet-stream"})
            return
        offset = 0
        while offset < size:
            n = min(chunk, size - offset)
            r = self.request("PATCH", loc, ok=(202,), data=_FileSlice(path, offset, n, progress), repo=repo,
                             headers={"Content-Type": "application/octet-stream",
                                      "Content-Range": f"{offset}-{offset + n - 1}"})
            loc = self._location(r)
            offset += n
        self.request("PUT", self._with_digest(loc, digest), ok=(201,), repo=repo, headers={"Content-Length": "0"})

    def get_blob(self, repo: str, digest: str, *, offset: int = 0) -> requests.Response:
        headers = {"Range": f"bytes={offset}-"} if offset else None
        return self.request("GET", f"/v2/{repo}/blobs/{digest}", ok=(200, 206), allow=(416,), headers=headers,
                            stream=True, repo=repo)

    def get_small_blob(self, repo: str, digest: str, limit: int = 64 << 20, what: str = "blob") -> bytes:
        r = self.get_blob(repo, digest)
        data = r.raw.read(limit + 1, decode_content=True) if r.status_code in (200, 206) else b""
        r.close()
        if len(data) > limit:
            raise InvalidArtifactError(f"{repo}: {what} {digest[:19]}… is larger than {limit / 2**20:g} MiB",
                                       hint="this is not an artifact adapterhub pushed")
        if sha256_digest(data) != digest:
            raise IntegrityError(f"{self.host}/{repo}: blob {digest[:19]}… does not match its digest",
                                 hint="the registry holds damaged data; nothing was imported")
        return data

    # -- manifests ------------------------------------------------------------------

    def get_manifest(self, repo: str, reference: str, *, allow_missing: bool = False) -> tuple[bytes, str, str] | None:
        """(bytes, media type, digest) of a manifest; the digest is checked against the bytes."""
        accept = ", ".join((MANIFEST_TYPE, INDEX_TYPE, *DOCKER_MANIFEST_TYPES))
        try:
            r = self.request("GET", f"/v2/{repo}/manifests/{reference}", headers={"Accept": accept}, repo=repo,
                             allow=(404,) if allow_missing else (), stream=True)
        except NotFoundError:
            sep = "@" if reference.startswith("sha256:") else ":"
            raise NotFoundError(f"{self.host}/{repo}{sep}{reference} is not on the registry",
                                hint="`adapterhub search --remote NAME` lists what it holds") from None
        if r.status_code == 404:
            r.close()
            return None
        data = r.raw.read(MANIFEST_LIMIT + 1, decode_content=True)
        r.close()
        if len(data) > MANIFEST_LIMIT:
            raise InvalidArtifactError(f"{self.host}/{repo}:{reference}: the manifest is larger than "
                                       f"{MANIFEST_LIMIT / 2**20:g} MiB", hint="this is not an artifact adapterhub pushed")
        digest = sha256_digest(data)
        claimed = r.headers.get("Docker-Content-Digest")
        if (reference.startswith("sha256:") and digest != reference) or (claimed and claimed != digest):
            raise IntegrityError(f"{self.host}/{repo}: the manifest {reference} does not match its digest",
                                 hint="the registry (or something between) changed it; nothing was imported")
        media = r.headers.get("Content-Type", "").split(";")[0].strip()
        try:
            media = json.loads(data).get("mediaType") or media
        except (ValueError, AttributeError):
            raise InvalidArtifactError(f"{self.host}/{repo}:{reference} is not a JSON manifest") from None
        return data, media, digest

    def put_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> requests.Response:
        r = self.request("PUT", f"/v2/{repo}/manifests/{reference}", ok=(201,), data=data, repo=repo,
                         headers={"Content-Type": media_type})
        claimed = r.headers.get("Docker-Content-Digest")
        if claimed and claimed != sha256_digest(data):
            raise IntegrityError(f"{self.host}/{repo}: the registry stored the manifest under {claimed}, not {sha256_digest(data)}")
        return r

    def tags(self, repo: str) -> list[str]:
        out: list[str] = []
        path: str | None = f"/v2/{repo}/tags/list?n=1000"
        while path:
            r = self.request("GET", path, repo=repo, allow=(404,), stream=True)
            if r.status_code == 404:
                r.close()
                return out
            out += self._listing(r, "tags")
            path = self._next(r)
        return out

    def catalog(self) -> list[str]:
        out: list[str] = []
        path: str | None = "/v2/_catalog?n=1000"
        while path:
            r = self.request("GET", path, stream=True)
            out += self._listing(r, "repositories")
            path = self._next(r)
        return out

    def _listing(self, r: requests.Response, key: str) -> list[Any]:
        """The list under ``key`` of a JSON answer; anything else is an error, not a crash."""
        try:
            doc = json.loads(read_capped(r, LISTING_LIMIT, f"{self.host}: the {key} listing"))
        except ValueError:
            raise RemoteError(f"{self.host}: the {key} listing is not JSON") from None
        items = doc.get(key) if isinstance(doc, dict) else None
        return items if isinstance(items, list) else []

    def _next(self, r: requests.Response) -> str | None:
        """The next page, on this registry only (the credentials go with every request)."""
        link = _next_link(r)
        if link is None:
            return None
        target = urlsplit(urljoin(r.url or self.base, link))
        if (target.scheme, target.netloc) != tuple(urlsplit(self.base)[:2]):
            raise RemoteError(f"{self.host} pointed the next page of a listing to another host ({target.netloc})")
        return urlunsplit(("", "", target.path, target.query, ""))


def _next_link(resp: requests.Response) -> str | None:
    link = resp.headers.get("Link", "")
    m = re.search(r"<([^>]+)>;\s*rel=\"?next\"?", link)
    return m.group(1) if m else None


class _FileSlice:
    """``length`` bytes of a file from ``offset``, streamed (requests sends Content-Length from ``len``)."""

    def __init__(self, path: Path, offset: int, length: int, progress: Any = None) -> None:
        self.path, self.offset, self.length, self.progress = path, offset, length, progress

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[bytes]:
        left = self.length
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset)
            while left > 0:
                data = f.read(min(READ_CHUNK * 4, left))
                if not data:
                    raise IntegrityError(f"{self.path} is shorter than the registry index says")
                left -= len(data)
                if self.progress is not None:
                    self.progress.update(len(data))
                yield data


def client_for(ep: Endpoint) -> Client:
    c = ep.creds
    return Client(ep.url.host, insecure=ep.insecure, loopback=ep.url.loopback, username=c.username,
                  password=c.password, token=c.token)


# -- push ------------------------------------------------------------------------------


def build_config(reg: Registry, ref: str) -> tuple[dict[str, Any], list[tuple[Any, Path]]]:
    """Our config document for ``ref`` (deterministic, so a re-push uploads nothing) and its files."""
    show = reg.show(ref)
    v = show.version
    files = reg.files(ref)
    lineage = [{"parent": r["parent"], "relation": r["relation"], "recipe": r["recipe"]} for r in show.lineage]
    doc = {
        "schemaVersion": 1,
        "name": v.name,
        "version": v.version,
        "digest": v.digest,
        "tags": [t for t in v.tags],
        "description": v.description,
        "created_at": v.created_at,
        "kind": v.kind,
        "inspection": show.inspection,
        "files": [e.to_dict() for e, _ in files],
        "lineage": lineage,
    }
    return doc, files


def _annotations(doc: dict[str, Any]) -> dict[str, str]:
    ins = doc.get("inspection") or {}
    ann = {
        "org.opencontainers.image.title": doc["name"],
        "org.opencontainers.image.version": doc["version"],
        "org.opencontainers.image.created": doc["created_at"],
        A + "name": doc["name"],
        A + "version": doc["version"],
        A + "digest": doc["digest"],
        A + "kind": doc["kind"],
        A + "base-model": ins.get("base_model"),
        A + "base-revision": ins.get("base_revision"),
        A + "method": ins.get("method"),
        A + "rank": None if ins.get("rank") is None else str(ins["rank"]),
        A + "quantization": ins.get("quant"),
        A + "size": str(sum(f["size"] for f in doc["files"])),
    }
    if doc.get("description"):
        ann["org.opencontainers.image.description"] = doc["description"]
    return {k: v for k, v in ann.items() if v is not None}


def push(reg: Registry, ref: str, ep: Endpoint, *, tags: tuple[str, ...] = (), progress: Any = None) -> dict[str, Any]:
    """Upload ``ref`` as an OCI artifact (blobs first, HEAD before each, then manifest, tags, signatures)."""
    t0 = time.perf_counter()
    info = reg.resolve(ref)
    url = ep.url
    if ep.remote is not None and url.path == ep.remote.url.path:
        repo = url.repository(info.name)  # `push REF --remote NAME`
        reference = None
    else:
        repo, reference = url.path, url.reference  # a full oci://host/ns/name:tag target
    check_repository(repo)
    main_tag = check_oci_tag(reference or info.version, "version")
    if main_tag.startswith("sha256:"):
        raise InvalidNameError("push to a tag, not to a digest")
    extra = [check_oci_tag(t) for t in (*info.tags, *tags)]
    doc, files = build_config(reg, f"{info.name}:{info.version}")
    config_bytes = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    config_desc = {"mediaType": CONFIG_TYPE, "digest": sha256_digest(config_bytes), "size": len(config_bytes)}
    layers = [{"mediaType": FILE_TYPE, "digest": "sha256:" + e.sha256, "size": e.size, "annotations": {TITLE: e.path}}
              for e, _ in files]
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "artifactType": ARTIFACT_TYPES.get(info.kind, ARTIFACT_TYPES["checkpoint"]),
        "config": config_desc,
        "layers": layers,
        "annotations": _annotations(doc),
    }
    manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()
    mdigest = sha256_digest(manifest_bytes)
    client = client_for(ep)
    client.ping()

    # Versions are immutable on the remote too: refuse to move a version tag to other content.
    existing = client.get_manifest(repo, main_tag, allow_missing=True)
    if existing is not None and existing[2] != mdigest:
        try:
            other = json.loads(existing[0]).get("annotations", {}).get(A + "digest")
        except (ValueError, AttributeError):
            other = None
        if other != info.digest:
            raise ConflictError(f"{ep.url.host}/{repo}:{main_tag} already holds other content",
                                hint="versions are immutable: push another version, or to another tag")
        # Same files, other metadata (pushed from another registry, where the
        # version has another creation time or tags): the remote keeps the
        # first manifest, so every client's signatures refer to one subject.
        manifest_bytes, mdigest = existing[0], existing[2]
        manifest = json.loads(manifest_bytes)
        config_desc = manifest["config"]

    uploaded = skipped = 0
    bytes_up = 0
    seen: set[str] = set()
    todo = []
    for e, path in files:
        d = "sha256:" + e.sha256
        if d in seen:
            continue
        seen.add(d)
        if client.has_blob(repo, d):
            skipped += 1
        else:
            todo.append((e, path, d))
    files_present = skipped
    bar = progress(f"uploading {info.name}:{info.version}", sum(e.size for e, _, _ in todo)) if progress else None
    try:
        for e, path, d in todo:
            if not path.exists():
                raise IntegrityError(f"the blob for {e.path} is missing from the registry", hint="run `adapterhub fsck`")
            client.upload_file(repo, path, d, e.size, bar)
            uploaded += 1
            bytes_up += e.size
    finally:
        if bar is not None:
            bar.close()
    files_uploaded, file_bytes = uploaded, bytes_up
    config_uploaded = False
    if client.has_blob(repo, config_desc["digest"]):
        skipped += 1
    elif config_desc["digest"] != sha256_digest(config_bytes):
        raise IntegrityError(f"{ep.url.host}/{repo}:{main_tag}: the remote's manifest refers to a config blob it does not have")
    else:
        client.upload_bytes(repo, config_bytes, config_desc["digest"])
        config_uploaded = True
        uploaded += 1
        bytes_up += len(config_bytes)
    pushed_tags = []
    for tag in dict.fromkeys([main_tag, *extra]):
        client.put_manifest(repo, tag, manifest_bytes, MANIFEST_TYPE)
        pushed_tags.append(tag)
    sig = _push_signatures(reg, client, repo, info.digest, mdigest, len(manifest_bytes))
    uploaded += sig["blobs_uploaded"]
    skipped += sig["blobs_skipped"]
    return {
        "ref": f"{info.name}:{info.version}",
        "digest": info.digest,
        "target": f"oci://{ep.url.host}/{repo}:{main_tag}",
        "repository": repo,
        "tags": pushed_tags,
        "manifest_digest": mdigest,
        "artifact_type": manifest["artifactType"],
        # Every blob (files, config, signature bundles and their empty config), as before.
        "blobs_uploaded": uploaded,
        "blobs_skipped": skipped,
        "bytes_uploaded": bytes_up,
        # The artifact's files on their own (distinct contents), then the metadata blobs.
        "files_uploaded": files_uploaded,
        "files_present": files_present,
        "file_bytes_uploaded": file_bytes,
        "config_uploaded": config_uploaded,
        "artifact_digest": info.digest,
        "signatures_pushed": sig["pushed"],
        "signatures_present": sig["present"],
        "referrers": sig["mode"],
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _fallback_tag(digest: str) -> str:
    return digest.replace(":", "-")


def _push_signatures(reg: Registry, client: Client, repo: str, digest: str, mdigest: str, msize: int) -> dict[str, Any]:
    out = {"pushed": 0, "present": 0, "blobs_uploaded": 0, "blobs_skipped": 0, "mode": None}
    rows = reg.signatures(digest)
    if not rows:
        return out
    subject = {"mediaType": MANIFEST_TYPE, "digest": mdigest, "size": msize}
    known = {d["digest"] for d in _referrers(client, repo, mdigest)[0]}
    empty = {"mediaType": EMPTY_TYPE, "digest": sha256_digest(EMPTY_JSON), "size": len(EMPTY_JSON), "data": "e30="}
    new_descs = []
    for row in sorted(rows, key=lambda r: (r["created_at"], r["blob"])):
        raw = reg.read_signature(row["blob"])
        layer = {"mediaType": SIGNATURE_TYPE, "digest": "sha256:" + row["blob"], "size": len(raw)}
        # Nothing local (such as when this registry stored the row) goes in:
        # the same bundle must give the same manifest from every client.
        ann = {A + "signature.kind": row["kind"], A + "signature.key-id": row["key_id"]}
        sm = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "artifactType": SIGNATURE_TYPE, "config": empty,
              "layers": [layer], "subject": subject, "annotations": ann}
        sbytes = json.dumps(sm, separators=(",", ":")).encode()
        sdigest = sha256_digest(sbytes)
        if sdigest in known:
            out["present"] += 1
            continue
        for d, data in ((empty["digest"], EMPTY_JSON), (layer["digest"], raw)):
            if client.has_blob(repo, d):
                out["blobs_skipped"] += 1
            else:
                client.upload_bytes(repo, data, d)
                out["blobs_uploaded"] += 1
        r = client.put_manifest(repo, sdigest, sbytes, MANIFEST_TYPE)
        if r.headers.get("OCI-Subject") == mdigest:
            out["mode"] = "api"  # the registry indexes referrers itself
        else:
            new_descs.append({"mediaType": MANIFEST_TYPE, "digest": sdigest, "size": len(sbytes),
                              "artifactType": SIGNATURE_TYPE, "annotations": ann})
        out["pushed"] += 1
    if new_descs:
        _update_fallback_index(client, repo, mdigest, new_descs)
        out["mode"] = "tag"
    elif out["mode"] is None:
        out["mode"] = "present"
    return out


def _update_fallback_index(client: Client, repo: str, mdigest: str, descs: list[dict[str, Any]]) -> None:
    """Add ``descs`` to the ``sha256-<hex>`` index; re-read and merge again if a concurrent pusher raced us."""
    tag = _fallback_tag(mdigest)
    for _ in range(8):
        cur = client.get_manifest(repo, tag, allow_missing=True)
        index = json.loads(cur[0]) if cur else {"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": []}
        have = {m.get("digest") for m in index.get("manifests", [])}
        index["manifests"] = list(index.get("manifests", [])) + [d for d in descs if d["digest"] not in have]
        client.put_manifest(repo, tag, json.dumps(index, separators=(",", ":")).encode(), INDEX_TYPE)
        check = client.get_manifest(repo, tag, allow_missing=True)
        now_have = {m.get("digest") for m in json.loads(check[0]).get("manifests", [])} if check else set()
        if all(d["digest"] in now_have for d in descs):
            return
        time.sleep(0.05 + secrets.randbelow(100) / 1000)
    raise RemoteError(f"{client.host}/{repo}: could not record the signatures in the referrers index {tag} (concurrent updates)")


def _referrers(client: Client, repo: str, mdigest: str) -> tuple[list[dict[str, Any]], str]:
    """Referrer descriptors of ``mdigest``: from the referrers API, else from the fallback tag."""
    r = client.request("GET", f"/v2/{repo}/referrers/{mdigest}", repo=repo, allow=(404, 400, 405),
                       headers={"Accept": INDEX_TYPE}, stream=True)
    if r.status_code == 200 and r.headers.get("Content-Type", "").startswith(INDEX_TYPE):
        try:
            doc = json.loads(read_capped(r, MANIFEST_LIMIT, f"{client.host}/{repo}: the referrers of {mdigest[:19]}…"))
            return list(doc.get("manifests") or []) if isinstance(doc, dict) else [], "api"
        except ValueError:
            pass
    r.close()
    cur = client.get_manifest(repo, _fallback_tag(mdigest), allow_missing=True)
    if cur is None:
        return [], "tag"
    try:
        return list(json.loads(cur[0]).get("manifests") or []), "tag"
    except (ValueError, AttributeError):
        return [], "tag"


# -- pull ------------------------------------------------------------------------------


@dataclass
class _Plan:
    repo: str
    reference: str
    manifest_digest: str
    ours: bool
    config: dict[str, Any]
    files: list[tuple[str, str, int]]  # (relpath, sha256 hex, size)
    name: str
    version: str | None
    annotations: dict[str, str]


def staging_root(reg: Registry) -> Path:
    return reg.home / "remote-staging"


def _plan(client: Client, repo: str, reference: str, name: str | None) -> _Plan:
    from adapterhub.manifest import FileEntry, Manifest
    from adapterhub.refs import (
        check_name,
        check_tag,
        check_version,
        parse_target,
    )

    from adapterhub.registry.remotes import (
        check_file_path,
        check_file_tree,
        check_lineage,
        check_text,
    )

    # --name NAME[:VERSION], as for hf:// pulls: the version given overrides the config's.
    name, name_version = parse_target(name) if name else (None, None)
    got = client.get_manifest(repo, reference)
    assert got is not None
    data, media, mdigest = got
    where = f"{client.host}/{repo}:{reference}"
    if media in (INDEX_TYPE, DOCKER_MANIFEST_TYPES[1]):
        raise InvalidArtifactError(f"{where} is an image index, not one artifact",
                                   hint="pull one of its manifests by digest (oci://HOST/REPO@sha256:...)")
    m = json.loads(data)
    if not isinstance(m, dict):
        raise InvalidArtifactError(f"{where}: malformed manifest")
    cfg_desc = m.get("config") or {}
    layers = m.get("layers") or []
    ann = m.get("annotations") or {}
    if not isinstance(layers, list) or not isinstance(cfg_desc, dict) or not isinstance(ann, dict):
        raise InvalidArtifactError(f"{where}: malformed manifest")
    ours = cfg_desc.get("mediaType") == CONFIG_TYPE
    if not ours and cfg_desc.get("mediaType") in IMAGE_CONFIG_TYPES:
        raise InvalidArtifactError(f"{where} is a container image, not an adapterhub artifact or a set of files")
    files = []
    for i, layer in enumerate(layers):
        layer_ann = layer.get("annotations") if isinstance(layer, dict) else None
        if not isinstance(layer, dict) or not isinstance(layer_ann or {}, dict):
            raise InvalidArtifactError(f"{where}: layer {i} is not a valid descriptor")
        title = (layer_ann or {}).get(TITLE)
        if title is None or title == "":
            raise InvalidArtifactError(f"{where}: layer {i} ({layer.get('mediaType')}) has no {TITLE} annotation, "
                                       "so it is not a file of an artifact", hint="only artifacts whose layers are named files can be pulled")
        title = check_file_path(title, f"{where}: layer {i}")
        d = layer.get("digest")
        size = layer.get("size")
        # The digest names the staged file: only sha256:<64 lowercase hex> gets that far.
        if not isinstance(d, str) or not _SHA256.fullmatch(d) or type(size) is not int or size < 0:
            raise InvalidArtifactError(f"{where}: layer {title!r} has no valid sha256 digest and size")
        files.append((title, d[7:], size))
    if not files:
        raise InvalidArtifactError(f"{where} has no files")
    entries = Manifest.from_entries(FileEntry(p, s, h) for p, h, s in files)  # safe, unique paths
    check_file_tree([p for p, _, _ in files], where)
    config: dict[str, Any] = {}
    if ours:
        config = _read_config(client, repo, cfg_desc, where)
        listed = config.get("files")
        try:
            if not isinstance(listed, list):
                raise TypeError
            listed_set = {(f["path"], f["sha256"], f["size"]) for f in listed}
        except (KeyError, TypeError):
            raise InvalidArtifactError(f"{where}: the config's file list is malformed") from None
        if listed_set != set(files) or len(listed) != len(files):
            raise IntegrityError(f"{where}: the config's file list does not match the manifest's layers")
        if entries.digest != config.get("digest"):
            raise IntegrityError(f"{where}: the files hash to {entries.digest[:19]}…, not to the artifact digest "
                                 f"{str(config.get('digest'))[:19]}… the config claims")
        # What the import uses from the config, checked now (before any download).
        config["lineage"] = check_lineage(config.get("lineage"), f"{where}: config")
        check_text(config.get("description"), "description", f"{where}: config")
        tags = config.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise InvalidArtifactError(f"{where}: the config's tags are not a list of names")
        config["tags"] = [check_tag(t) for t in tags]
        local_name = name or config.get("name")
        version = config.get("version")
        if version is not None and not isinstance(version, str):
            raise InvalidNameError(f"{where}: the config's version is not a string")
    else:
        local_name = name or repo.rsplit("/", 1)[-1]
        version = None if reference == "latest" or reference.startswith("sha256:") else reference
        if version is not None:
            try:
                check_version(version)
            except InvalidNameError:
                version = None
    if not isinstance(local_name, str):
        raise InvalidNameError(f"{where}: the config names no artifact", hint="pass --name NAME")
    try:
        check_name(local_name)
    except InvalidNameError as e:
        raise InvalidNameError(f"{local_name[:80]!r} cannot be a local name", hint="pass --name NAME[:VERSION]") from e
    if name_version is not None:
        version = name_version
    if version is not None:
        check_version(version)
    return _Plan(repo, reference, mdigest, ours, config, files, local_name, version, ann)


_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")
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


def read_capped(r: requests.Response, limit: int, what: str) -> bytes:
    """The body of a streamed response, refused past ``limit`` bytes (never read whole first)."""
    try:
        data = r.raw.read(limit + 1, decode_content=True)
    finally:
        r.close()
    if len(data) > limit:
        raise RemoteError(f"{what} is larger than {limit / 2**20:g} MiB", hint="the registry sent far more than such an answer needs")
    return data


def _read_config(client: Client, repo: str, desc: dict[str, Any], where: str) -> dict[str, Any]:
    """Our config blob: a valid digest first, at most :data:`CONFIG_LIMIT` bytes, a JSON object."""
    d = desc.get("digest")
    if not isinstance(d, str) or not _SHA256.fullmatch(d):
        raise InvalidArtifactError(f"{where}: the config has no valid sha256 digest")
    size = desc.get("size")
    if isinstance(size, int) and size > CONFIG_LIMIT:
        raise InvalidArtifactError(f"{where}: the config blob is {size} bytes; the limit is {CONFIG_LIMIT >> 20} MiB",
                                   hint="this is not an artifact adapterhub pushed")
    raw = client.get_small_blob(repo, d, limit=CONFIG_LIMIT, what="config blob")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArtifactError(f"{where}: the config blob is not JSON") from None
    if not isinstance(doc, dict):
        raise InvalidArtifactError(f"{where}: the config blob is not a JSON object")
    return doc


def _fetch_signatures(client: Client, repo: str, mdigest: str, digest: str) -> list[dict[str, Any]]:
    """Signature bundles attached to ``mdigest`` (each manifest and blob checked against its digest)."""
    from adapterhub.trust.signing import parse_bundle

    descs, _ = _referrers(client, repo, mdigest)
    out = []
    for d in descs:
        # Referrers are not the artifact: one that is malformed, too big or not a
        # bundle is skipped (a policy that needs a signature then refuses the pull).
        if not isinstance(d, dict) or d.get("artifactType") != SIGNATURE_TYPE:
            continue
        if not isinstance(d.get("digest"), str) or not _SHA256.fullmatch(d["digest"]):
            continue
        got = client.get_manifest(repo, d["digest"], allow_missing=True)
        if got is None:
            continue
        sm = json.loads(got[0])
        if not isinstance(sm, dict) or not isinstance(sm.get("subject"), dict) or sm["subject"].get("digest") != mdigest:
            continue
        ann = sm.get("annotations") if isinstance(sm.get("annotations"), dict) else {}
        layers = sm.get("layers") if isinstance(sm.get("layers"), list) else []
        for layer in layers:
            if not isinstance(layer, dict) or layer.get("mediaType") != SIGNATURE_TYPE:
                continue
            ld, size = layer.get("digest"), layer.get("size")
            if not isinstance(ld, str) or not _SHA256.fullmatch(ld) or (isinstance(size, int) and size > SIGNATURE_LIMIT):
                continue
            try:
                raw = client.get_small_blob(repo, ld, limit=SIGNATURE_LIMIT, what="signature")
            except InvalidArtifactError:
                continue
            kind = ann.get(A + "signature.kind", "model")
            try:
                b = parse_bundle(raw)
            except TrustError:
                continue
            if b.subject_digest != digest and kind == "model":
                continue
            out.append({"raw": raw, "key_id": b.key_hint, "kind": kind if kind in ("model", "provenance") else "model"})
    return out


def _download(client: Client, repo: str, digest_hex: str, size: int, blobs: Path, bar: Any, stats: dict[str, int]) -> Path:
    """Download one blob into ``blobs/<hex>``, resuming ``<hex>.partial`` with Range, hashing as it streams."""
    final = blobs / digest_hex
    partial = blobs / f"{digest_hex}.partial"
    for attempt in range(2):
        offset = 0
        h = hashlib.sha256()
        try:
            if final.exists():
                os.rename(final, partial)  # re-verified below, as a resume of the whole size
            if partial.exists():
                offset = partial.stat().st_size
                if offset > size:
                    partial.unlink()
                    offset = 0
                else:
                    with open(partial, "rb", buffering=0) as f:
                        while chunk := f.read(8 * READ_CHUNK):
                            h.update(chunk)
            if offset < size or size == 0:
                resp = client.get_blob(repo, "sha256:" + digest_hex, offset=offset)
                if resp.status_code == 200 and offset:
                    offset, h = 0, hashlib.sha256()  # the server ignored Range: start over
                    mode = "wb"
                elif resp.status_code == 416:
                    resp.close()
                    mode = ""
                else:
                    mode = "ab" if offset else "wb"
                if mode:
                    stats["resumed_bytes"] += offset
                    if bar is not None and offset:
                        bar.update(offset)
                    _stream(resp, partial, mode, h, bar, size - offset, offset)
            elif bar is not None:
                bar.update(size)
                stats["resumed_bytes"] += size
        except OSError as e:
            if e.errno == errno.ENOSPC:
                partial.unlink(missing_ok=True)
                raise StorageError("no space left on device while downloading", hint="free some space, then retry") from e
            raise
        got_size = partial.stat().st_size
        if got_size == size and h.hexdigest() == digest_hex:
            os.replace(partial, final)
            return final
        partial.unlink(missing_ok=True)
        if offset and attempt == 0:
            continue  # the kept prefix may have been bad: one fresh download
        raise IntegrityError(
            f"{client.host}/{repo}: blob sha256:{digest_hex[:12]}… does not match its digest "
            f"({got_size} bytes, sha256 {h.hexdigest()[:12]}…)",
            hint="the registry holds damaged data; nothing was imported",
        )
    raise AssertionError("unreachable")


STREAM_CHUNK = 4 * READ_CHUNK
STREAM_BUFFERS = 3  # one being read from the socket, two being hashed and written


class _BlobWriter:
    """Writes a download to ``fd``; with O_DIRECT while offsets and lengths allow it.

    O_DIRECT sends the bytes from our buffer to the disk without a copy into
    the page cache. On the 2-core VM of ``bench/bench_remote.py`` that copy,
    and getting fresh page-cache memory for it, cost about 1 CPU-second per
    GiB, more than the hash. A filesystem or a length that refuses O_DIRECT
    (EINVAL) gets ordinary writes from there on; the file is fsynced either way.
    """

    def __init__(self, path: Path, append: bool, offset: int, direct: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        if direct and offset % DIRECT_ALIGN == 0:
            self.fd, self.direct = open_direct(path, flags, 0o600)
        else:
            self.fd, self.direct = os.open(path, flags, 0o600), False

    def _buffered(self) -> None:
        clear_direct(self.fd)
        self.direct = False

    def write(self, view: memoryview) -> None:
        if self.direct and len(view) % DIRECT_ALIGN:
            self._buffered()  # the last, short chunk: the offset after it is not aligned
        while view:
            try:
                view = view[os.write(self.fd, view):]
            except OSError as e:
                if not (self.direct and e.errno == errno.EINVAL):
                    raise
                self._buffered()


def _stream(resp: requests.Response, path: Path, mode: str, h: Any, bar: Any, expected: int, offset: int = 0) -> None:
    """Write the body to ``path`` (appending from ``offset`` in mode ``ab``), hashing it into ``h``.

    The main thread reads the socket; one thread hashes and another writes
    each chunk (hashlib and os.write drop the GIL), so reading, hashing and
    writing overlap. Both read the same buffer, which is refilled only once
    its hash and its write are done.
    """
    import requests

    # http.client's readinto fills our buffers straight from the socket;
    # urllib3's read(amt) allocates and copies every chunk (about 2x the CPU).
    fp = getattr(resp.raw, "_fp", None)
    direct = fp is not None and hasattr(fp, "readinto") and not resp.headers.get("Content-Encoding")
    n = 0
    try:
        out = _BlobWriter(path, mode == "ab", offset, direct)
    except BaseException:
        resp.close()
        raise
    try:
        inflight: list[tuple[Any, Any]] = []
        with ThreadPoolExecutor(1) as hasher, ThreadPoolExecutor(1) as writer:
            try:
                for chunk in (_readinto_chunks(fp) if direct else resp.iter_content(chunk_size=STREAM_CHUNK)):
                    if not chunk:
                        continue
                    view = memoryview(chunk)
                    inflight.append((hasher.submit(h.update, view), writer.submit(out.write, view)))
                    if len(inflight) >= STREAM_BUFFERS:
                        for fut in inflight.pop(0):
                            fut.result()
                    n += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                    if n > expected:
                        break
            except (requests.RequestException, ConnectionError) as e:
                raise RemoteError(f"the download broke off after {n} bytes: {e}",
                                  hint="run the same pull again: it resumes where it stopped") from None
            finally:
                for pair in inflight:
                    for fut in pair:
                        fut.exception()  # wait: the buffers are refilled only once both are done
            for pair in inflight:
                for fut in pair:
                    fut.result()
        os.fsync(out.fd)
    finally:
        os.close(out.fd)
        resp.close()


def _readinto_chunks(fp: Any) -> Iterator[memoryview]:
    """Views of :data:`STREAM_BUFFERS` rotating page-aligned buffers (anonymous
    maps, as O_DIRECT needs). A buffer is refilled only after the caller has
    waited for the hash and the write of the view it last held."""
    bufs = [mmap.mmap(-1, STREAM_CHUNK) for _ in range(STREAM_BUFFERS)]
    i = 0
    while True:
        buf = bufs[i % STREAM_BUFFERS]
        k = fp.readinto(buf)
        if not k:
            return
        yield memoryview(buf)[:k]
        i += 1


def pull(reg: Registry, ep: Endpoint, *, name: str | None = None, require_signature: bool = False,
         require_provenance: bool = False, progress: Any = None) -> dict[str, Any]:
    """Import ``ep`` (an ``oci://host/repo:tag`` URL) into the local registry.

    Nothing is imported unless every blob matched its digest and the trust
    policy passed (``require-signature``, ``require-provenance``, or the
    arguments of those names). Blobs are kept in ``remote-staging/blobs``
    while they download, so a broken pull resumes (HTTP Range) when it is
    run again.
    """
    from adapterhub.trust import policy

    t0 = time.perf_counter()
    url = ep.url
    repo = url.path
    check_repository(repo)
    reference = url.reference or "latest"
    if not reference.startswith("sha256:"):
        check_oci_tag(reference)
    client = client_for(ep)
    client.ping()
    plan = _plan(client, repo, reference, name)
    digest = plan.config.get("digest") if plan.ours else None
    rules = policy.required(reg, plan.name)
    need_sig = require_signature or "require-signature" in rules
    need_prov = require_provenance or "require-provenance" in rules

    # Conflicts and trust first: nothing is downloaded for a pull that must fail.
    if plan.version is not None:
        row = reg.index.conn.execute("select digest from versions where name = ? and version = ?",
                                     (plan.name, plan.version)).fetchone()
        if row is not None and digest is not None and row[0] != digest:
            raise ConflictError(f"{plan.name}:{plan.version} exists here with other content",
                                hint="pull under another name with --name")
    sigs = _fetch_signatures(client, repo, plan.manifest_digest, digest) if digest else []
    if need_sig and not any(s["kind"] == "model" for s in sigs):
        raise TrustError(f"{url} is not signed, and the trust policy requires a signature",
                         hint="ask the publisher to `adapterhub sign` and push again")
    prov = None
    if need_prov and digest is not None and (plan.config.get("lineage") or plan.config.get("kind") in DERIVED_KINDS):
        _check_provenance(reg, plan, digest, sigs, url)
        prov = "verified"

    # One pull at a time per home: two pulls of one blob would share its partial file.
    with _staging_lock(staging_root(reg)):
        res = _import(reg, client, plan, url, repo, reference, digest, sigs, need_sig, need_prov and prov is None,
                      progress, t0)
    res["provenance_required"] = need_prov
    if prov:
        res["provenance"] = prov
    return res


DERIVED_KINDS = ("merged", "quantized")  # adapterhub.provenance.DERIVED_KINDS, without importing it


def _check_provenance(reg: Registry, plan: _Plan, digest: str, sigs: list[dict[str, Any]], url: Any) -> None:
    """Refuse, before any download, a derived artifact without a provenance attestation that verifies.

    As ``verify_chain`` does for a local pull: an attestation whose subject is
    ``digest``, whose inputs are the lineage the config records, signed by a
    key trusted for the name's namespace; and the chain of every parent that
    is already in this registry verifies too.
    """
    from adapterhub.trust import policy
    from adapterhub.trust.provenance import PREDICATE_TYPE, verify_chain
    from adapterhub.trust.signing import dsse_verify, parse_bundle

    lineage = [r for r in plan.config.get("lineage") or [] if isinstance(r, dict)]
    recorded = sorted((str(r.get("relation")), str(r.get("parent"))) for r in lineage)
    reasons = []
    ok = False
    for s in sigs:
        if s["kind"] != "provenance":
            continue
        try:
            b = parse_bundle(s["raw"], "provenance attestation")
            if b.predicate_type != PREDICATE_TYPE:
                raise TrustError(f"not a provenance attestation (predicate type {b.predicate_type})")
            if b.subject_digest != digest:
                raise TrustError(f"the attestation is for another artifact ({b.subject_digest[:19]}…)")
            inputs = b.statement["predicate"].get("inputs") or []
            claimed = sorted((str(i.get("relation")), str(i.get("digest"))) for i in inputs if isinstance(i, dict))
            if claimed != recorded:
                raise TrustError("the attested inputs differ from the lineage the artifact records")
            tk = policy.lookup(reg, b.key_hint)
            if tk is None:
                raise TrustError(f"signed by key {b.key_hint[:16]}…, which is not trusted")
            problem = tk.problem(policy.namespace_of(plan.name))
            if problem:
                raise TrustError(problem)
            dsse_verify(b, tk.public_key.encode(), "provenance attestation")
            ok = True
            break
        except (TrustError, IntegrityError) as e:
            reasons.append(str(e))
    if not ok:
        why = "; ".join(dict.fromkeys(reasons)) or "no signed provenance"
        raise TrustError(f"{url} is a derived artifact whose provenance does not verify ({why}), "
                         "and the trust policy requires it",
                         hint="ask the publisher to `adapterhub sign REF --provenance` and push again")
    for r in lineage:
        refs = reg.index.refs_of(str(r.get("parent")))
        if refs:
            chain = verify_chain(reg, refs[0])
            if not chain.ok:
                raise TrustError(f"{url}: {chain.problem()}", hint="`adapterhub provenance REF` shows the chain")


def _staging_lock_path(stage: Path) -> Path:
    return stage / "pull.lock"


@contextmanager
def _staging_lock(stage: Path) -> Iterator[None]:
    try:
        stage.mkdir(parents=True, exist_ok=True)
        fh = open(_staging_lock_path(stage), "a")  # noqa: SIM115 - held across the yield
    except OSError as e:
        raise _storage(e) from e
    with fh:
        deadline = time.monotonic() + 600
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StorageError("another pull into this registry is still running",
                                       hint="retry when it has finished") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# Partial downloads are kept so that running a broken pull again resumes it;
# after this long, ``gc`` takes them to be abandoned.
STAGING_MAX_AGE_S = 24 * 3600.0


@contextmanager
def _staging_idle(stage: Path) -> Iterator[bool]:
    """Hold the pull lock without waiting; yields False when a pull holds it now.

    Creates nothing: with no lock file, no pull has ever staged anything here.
    """
    try:
        fh = open(_staging_lock_path(stage), "rb")  # noqa: SIM115 - held across the yield
    except FileNotFoundError:
        yield True
        return
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass(frozen=True)
class StagedLeftover:
    """A file or work dir in ``remote-staging/`` that no pull needs any more."""

    path: Path
    freed: int  # bytes that deleting it gives back (0 for hard links)
    mtime_ns: int  # as listed; a file changed since then is kept (-1: a work dir)


def _stale_staging(stage: Path, max_age_s: float, now: float) -> list[StagedLeftover]:
    out = []
    for d in sorted(stage.glob("pull-*.incomplete")):  # a killed pull's work dir: any age
        freed = 0
        for p in d.rglob("*"):
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if not os.path.isdir(p) and st.st_nlink == 1:
                freed += st.st_size
        out.append(StagedLeftover(d, freed, -1))
    blobs = stage / "blobs"
    if blobs.is_dir():
        for p in sorted(blobs.iterdir()):
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if now - st.st_mtime >= max_age_s:
                out.append(StagedLeftover(p, st.st_size if st.st_nlink == 1 else 0, st.st_mtime_ns))
    return out


def stale_staging(reg: Registry, max_age_s: float = STAGING_MAX_AGE_S) -> tuple[list[StagedLeftover], bool]:
    """Leftovers of broken pulls in ``remote-staging/``; returns (leftovers, busy).

    Downloads (``blobs/<hex>``, ``blobs/<hex>.partial``) untouched for
    ``max_age_s``, and work dirs of killed pulls. ``busy`` is True, and
    nothing is listed, while a pull holds the staging lock.
    """
    stage = staging_root(reg)
    if not stage.is_dir():
        return [], False
    with _staging_idle(stage) as idle:
        if not idle:
            return [], True
        return _stale_staging(stage, max_age_s, time.time()), False


def remove_staging(reg: Registry, planned: Iterable[StagedLeftover]) -> tuple[list[StagedLeftover], bool]:
    """Delete what :func:`stale_staging` listed; returns (removed, busy).

    Under the pull lock, taken without waiting: while a pull runs nothing is
    removed (busy). A download changed since it was listed (a pull resumed
    it meanwhile) is kept.
    """
    stage = staging_root(reg)
    planned = list(planned)
    if not planned or not stage.is_dir():
        return [], False
    removed = []
    with _staging_idle(stage) as idle:
        if not idle:
            return [], True
        for item in planned:
            p = Path(item.path)
            if p.parent not in (stage, stage / "blobs"):
                continue  # only ever what stale_staging lists
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if item.mtime_ns < 0:
                shutil.rmtree(p, ignore_errors=True)
            elif st.st_mtime_ns == item.mtime_ns:
                p.unlink(missing_ok=True)
            else:
                continue
            removed.append(item)
    return removed, False


def _import(reg: Registry, client: Client, plan: _Plan, url: Any, repo: str, reference: str, digest: str | None,
            sigs: list[dict[str, Any]], need_sig: bool, refuse_derived: bool, progress: Any,
            t0: float) -> dict[str, Any]:
    """Download (resuming), verify, check signatures, then import; under the staging lock.

    ``refuse_derived``: provenance is required and was not verified, so an
    artifact that inspection finds to be merged or quantized is refused.
    """
    from adapterhub.trust import policy
    from adapterhub.inspect import inspect_path
    from adapterhub.trust.signing import check_bundle

    stage = staging_root(reg)
    blobs = stage / "blobs"
    stats = {"downloaded": 0, "local": 0, "resumed_bytes": 0}
    warnings: list[str] = []
    for old in stage.glob("pull-*.incomplete"):  # left by a killed pull (no other pull runs now)
        shutil.rmtree(old, ignore_errors=True)
    work = None
    try:
        blobs.mkdir(parents=True, exist_ok=True)
        work = stage / f"pull-{secrets.token_hex(6)}.incomplete"
        root = work / plan.name.rsplit("/", 1)[-1]
        root.mkdir(parents=True)
    except OSError as e:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        raise _storage(e) from e
    verified: dict[str, str] = {}
    sources: dict[str, Path] = {}
    todo = []
    for rel, hex_, size in plan.files:
        if reg.blobs.has(hex_, size):
            sources[hex_] = reg.blobs.path(hex_)
            stats["local"] += 1
        elif hex_ not in sources and hex_ not in {t[0] for t in todo}:
            todo.append((hex_, size))
    bar = progress(f"downloading {plan.name}", sum(s for _, s in todo)) if progress else None
    res = None
    keep = False
    try:
        try:
            for hex_, size in todo:
                sources[hex_] = _download(client, repo, hex_, size, blobs, bar, stats)
                stats["downloaded"] += 1
        finally:
            if bar is not None:
                bar.close()
        try:
            for rel, hex_, size in plan.files:
                dst = root / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(sources[hex_], dst)
                except OSError:
                    shutil.copyfile(sources[hex_], dst)
                verified[rel] = hex_
        except OSError as e:
            raise _storage(e) from e
        if need_sig:
            want = want_digest(plan, digest)
            checks = [check_bundle(s["raw"], root, reg=reg, expected_digest=want, namespace=policy.namespace_of(plan.name))
                      for s in sigs if s["kind"] == "model"]
            if not any(c.ok for c in checks):
                reasons = "; ".join(dict.fromkeys(c.reason for c in checks)) or "no signature"
                raise TrustError(f"{url}: no valid signature by a trusted key ({reasons})")
        target = plan.name + (f":{plan.version}" if plan.version else "")
        tags = [t for t in plan.config.get("tags", []) if t != "latest"] if plan.ours else []
        tags, kept = _tags_to_apply(reg, plan.name, tags, want_digest(plan, digest))
        warnings += [
            f"kept the local tag {plan.name}@{t} (it names {old}); the remote would move it: "
            f"`adapterhub tag {plan.name}:VERSION {t}` moves it by hand" for t, old in kept
        ]
        lineage = plan.config.get("lineage") or [] if plan.ours else []  # checked by _plan
        recipe = next((r["recipe"] for r in lineage if r.get("recipe")), None)
        ins = inspect_path(root)
        if refuse_derived and (lineage or ins.kind in DERIVED_KINDS):
            raise TrustError(f"{url} is a derived artifact ({ins.kind}) without verifiable provenance, "
                             "and the trust policy requires it")
        res = reg.push(root, target, tags=tags, description=plan.config.get("description") if plan.ours else None,
                       derived_from=[(r["parent"], r["relation"]) for r in lineage], recipe=recipe, verified=verified,
                       inspection=ins)
        if digest is not None and res.digest != digest:
            raise IntegrityError(f"{url}: imported content hashes to {res.digest}, not {digest}")
        added = 0
        for s in sigs:
            reg.add_signature(res.digest, s["raw"], s["key_id"], kind=s["kind"])
            added += 1
    except (RemoteError, KeyboardInterrupt):
        keep = True  # the next run resumes from what was downloaded
        raise
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        # Imported (the store holds hard links to them), or refused: drop the staged copies.
        # Kept for a resume: only this pull's downloads. Staged copies of blobs the store
        # already holds go either way: an import interrupted after it stored them leaves
        # them there, and later pulls skip downloading those blobs, so would never drop them.
        resume = {hex_ for hex_, _ in todo} if keep else set()
        for hex_ in {h for _, h, _ in plan.files} - resume:
            (blobs / hex_).unlink(missing_ok=True)
            (blobs / f"{hex_}.partial").unlink(missing_ok=True)
    assert res is not None
    return {
        "ref": res.ref,
        "digest": res.digest,
        "created": res.created,
        "source": f"oci://{client.host}/{repo}:{reference}" if not reference.startswith("sha256:") else f"oci://{client.host}/{repo}@{reference}",
        "manifest_digest": plan.manifest_digest,
        "adapterhub_artifact": plan.ours,
        "kind": res.inspection.kind,
        "tags": list(res.tags),
        "file_count": res.file_count,
        "size": res.size,
        "blobs_downloaded": stats["downloaded"],
        "blobs_local": stats["local"],
        "resumed_bytes": stats["resumed_bytes"],
        "signatures": added,
        "signature_required": need_sig,
        "warnings": warnings,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def want_digest(plan: _Plan, digest: str | None) -> str:
    from adapterhub.manifest import FileEntry, Manifest

    return digest or Manifest.from_entries(FileEntry(p, s, h) for p, h, s in plan.files).digest


def _tags_to_apply(reg: Registry, name: str, tags: list[str], digest: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The remote's tags that may be applied here, and those kept as they are.

    A tag the local registry already has for ``name`` on other content is not
    moved by a pull: what a remote claims must not repoint ``name@prod`` on this
    machine without the user saying so.
    """
    from adapterhub.refs import Ref

    apply, kept = [], []
    for t in tags:
        try:
            info = reg.index.resolve(Ref.parse(f"{name}@{t}"))
        except NotFoundError:
            apply.append(t)
            continue
        if info.digest == digest:
            apply.append(t)
        else:
            kept.append((t, f"{info.name}:{info.version}"))
    return apply, kept




def _storage(e: OSError) -> AdapterhubError:
    if e.errno == errno.ENOSPC:
        return StorageError("no space left on device while staging the pull", hint="free some space, then retry")
    return StorageError(f"cannot write the pull's staging area: {e}")


# -- search ----------------------------------------------------------------------------


def search(ep: Endpoint) -> list[dict[str, Any]]:
    """Every artifact under the remote's namespace: catalog, tags, manifests (and our configs)."""
    client = client_for(ep)
    client.ping()
    prefix = ep.url.path + "/" if ep.url.path else ""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for repo in client.catalog():
        # Names from the registry are cached and printed: only valid OCI names and tags are listed.
        if not isinstance(repo, str) or (prefix and not repo.startswith(prefix)) or not _valid_repository(repo):
            continue
        for tag in client.tags(repo):
            if not isinstance(tag, str) or not _OCI_TAG.match(tag) or re.fullmatch(r"sha256-[0-9a-f]{64}", tag):
                continue  # not a tag, or the referrers fallback index
            try:
                got = client.get_manifest(repo, tag, allow_missing=True)
            except (InvalidArtifactError, IntegrityError):
                continue  # not a manifest we can read: nothing to list
            if got is None:
                continue
            data, media, mdigest = got
            key = (repo, mdigest)
            if key in rows:
                rows[key]["tags"].append(tag)
                continue
            try:
                m = json.loads(data)
            except ValueError:
                continue
            if not isinstance(m, dict):
                continue
            row = _search_row(client, repo, prefix, m, media, mdigest, tag)
            if row is not None:
                rows[key] = row
    return sorted(rows.values(), key=lambda r: (r["repository"], r.get("version") or "", r["manifest_digest"]))


def _valid_repository(repo: str) -> bool:
    try:
        check_repository(repo)
    except InvalidNameError:
        return False
    return True


def _search_row(client: Client, repo: str, prefix: str, m: dict[str, Any], media: str, mdigest: str,
                tag: str) -> dict[str, Any] | None:
    """One search result from a manifest; fields of the wrong type are left out (None)."""

    def text(v: Any) -> str | None:
        return v if isinstance(v, str) else None

    ann = m.get("annotations")
    ann = {k: v for k, v in ann.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(ann, dict) else {}
    layers = m.get("layers") if isinstance(m.get("layers"), list) else []
    row: dict[str, Any] = {"repository": repo, "manifest_digest": mdigest, "tags": [tag], "media_type": media}
    row["artifact_type"] = text(m.get("artifactType"))
    row["metadata"] = {"annotations": ann}
    row["name"] = ann.get(A + "name") or repo[len(prefix):]
    row["version"] = ann.get(A + "version")
    row["digest"] = ann.get(A + "digest")
    row["kind"] = ann.get(A + "kind")
    row["method"] = ann.get(A + "method")
    row["base_model"] = ann.get(A + "base-model")
    rank = ann.get(A + "rank", "")
    row["rank"] = int(rank) if rank.isascii() and rank.isdigit() and len(rank) <= 9 else None
    row["quant"] = ann.get(A + "quantization")
    row["description"] = ann.get("org.opencontainers.image.description")
    row["size"] = sum(ly["size"] for ly in layers if isinstance(ly, dict) and type(ly.get("size")) is int and ly["size"] >= 0)
    cfg = m.get("config") if isinstance(m.get("config"), dict) else {}
    if cfg.get("mediaType") == CONFIG_TYPE:
        try:
            doc = _read_config(client, repo, cfg, f"{client.host}/{repo}:{tag}")
            ins = doc.get("inspection") if isinstance(doc.get("inspection"), dict) else {}
            details = ins.get("details") if isinstance(ins.get("details"), dict) else {}
            row["metadata"]["tags"] = doc.get("tags")
            row["metadata"]["target_modules"] = details.get("target_modules")
            row["metadata"]["lineage"] = doc.get("lineage")
            row["description"] = text(doc.get("description")) or row["description"]
        except AdapterhubError:
            row["metadata"]["config_error"] = "the config blob could not be read"
    return row
