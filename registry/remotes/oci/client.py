"""A small OCI distribution client over ``requests``: the transport (bounded
retries, errors mapped to adapterhub's) and the calls on blobs, manifests and
listings. Authentication is :mod:`.auth`'s.

Why plain ``requests`` and not the ``oras`` client (0.2.x): its download
writes a blob without checking its digest and cannot resume with HTTP Range,
its monolithic upload reads the whole file into memory, and its token flow
and retries would still need wrapping to give our errors and exit codes.
Those are the parts that matter here, so this package speaks the distribution
API itself, in about as much code as wrapping oras would take. The tests use
the ``oras`` client as a third-party pusher.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

from adapterhub.errors import (
    IntegrityError,
    InvalidArtifactError,
    InvalidNameError,
    NotFoundError,
    RemoteAuthError,
    RemoteError,
)
from adapterhub.registry.remotes.oci import media
from adapterhub.registry.remotes.oci.auth import Auth
from adapterhub.registry.remotes.oci.transfer import FileSlice
from adapterhub.registry.remotes.oci.media import (
    DOCKER_MANIFEST_TYPES,
    INDEX_TYPE,
    MANIFEST_TYPE,
    chunk_size,
    env_float,
    sha256_digest,
)

if TYPE_CHECKING:
    import requests

    from adapterhub.registry.remotes.dispatch import Endpoint


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
        self.auth = Auth(host, username=username, password=password, token=token)
        self.timeout = env_float("ADAPTERHUB_REMOTE_TIMEOUT", 30.0)
        self.retries = int(env_float("ADAPTERHUB_REMOTE_RETRIES", 3))
        self.requests = 0

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
                resp = self.session.request(method, self.url(path), headers=self._headers(path, headers), data=data,
                                            stream=stream, timeout=(self.timeout, self.timeout), allow_redirects=True)
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
                if self.auth.answer(resp.headers.get("WWW-Authenticate", ""), self._fetch_token):
                    if not resend:
                        raise _Retry()
                    return self.request(method, path, ok=ok, headers=headers, data=data, stream=stream, repo=repo,
                                        retry=retry, allow=allow)
                raise self.auth.failure()
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

    def _headers(self, path: str, headers: dict[str, str] | None) -> dict[str, str]:
        """``headers`` with the credentials, which go to the registry's own host only."""
        out = dict(headers or {})
        if tuple(urlsplit(self.url(path))[:2]) == tuple(urlsplit(self.base)[:2]):
            out.update(self.auth.header())
        return out

    def _fetch_token(self, realm: str, params: dict[str, str], basic: tuple[str, str] | None) -> dict[str, Any] | None:
        """GET a token from ``realm``; None when the service refuses."""
        import requests

        try:
            r = requests.get(realm, params=params, auth=basic, timeout=(self.timeout, self.timeout))
        except requests.RequestException as e:
            raise RemoteError(f"cannot reach the token service {realm}: {e}") from None
        if r.status_code != 200:
            return None
        try:
            doc = r.json()
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

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
            self.request("PUT", self._with_digest(loc, digest), ok=(201,), data=FileSlice(path, 0, size, progress),
                         repo=repo, headers={"Content-Type": "application/octet-stream"})
            return
        offset = 0
        while offset < size:
            n = min(chunk, size - offset)
            r = self.request("PATCH", loc, ok=(202,), data=FileSlice(path, offset, n, progress), repo=repo,
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
        data = r.raw.read(media.MANIFEST_LIMIT + 1, decode_content=True)
        r.close()
        if len(data) > media.MANIFEST_LIMIT:
            raise InvalidArtifactError(f"{self.host}/{repo}:{reference}: the manifest is larger than "
                                       f"{media.MANIFEST_LIMIT / 2**20:g} MiB", hint="this is not an artifact adapterhub pushed")
        digest = sha256_digest(data)
        claimed = r.headers.get("Docker-Content-Digest")
        if (reference.startswith("sha256:") and digest != reference) or (claimed and claimed != digest):
            raise IntegrityError(f"{self.host}/{repo}: the manifest {reference} does not match its digest",
                                 hint="the registry (or something between) changed it; nothing was imported")
        media_type = r.headers.get("Content-Type", "").split(";")[0].strip()
        try:
            media_type = json.loads(data).get("mediaType") or media_type
        except (ValueError, AttributeError):
            raise InvalidArtifactError(f"{self.host}/{repo}:{reference} is not a JSON manifest") from None
        return data, media_type, digest

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
            doc = json.loads(read_capped(r, media.LISTING_LIMIT, f"{self.host}: the {key} listing"))
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


def read_capped(r: requests.Response, limit: int, what: str) -> bytes:
    """The body of a streamed response, refused past ``limit`` bytes (never read whole first)."""
    try:
        data = r.raw.read(limit + 1, decode_content=True)
    finally:
        r.close()
    if len(data) > limit:
        raise RemoteError(f"{what} is larger than {limit / 2**20:g} MiB", hint="the registry sent far more than such an answer needs")
    return data


def client_for(ep: Endpoint) -> Client:
    c = ep.creds
    return Client(ep.url.host, insecure=ep.insecure, loopback=ep.url.loopback, username=c.username,
                  password=c.password, token=c.token)

