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
from adapterhub.registry.remotes.oci.http import Settings, Watchdog, backoff, retry_after, sending, session
from adapterhub.registry.remotes.oci.media import (
    DOCKER_MANIFEST_TYPES,
    INDEX_TYPE,
    MANIFEST_TYPE,
    chunk_size,
    sha256_digest,
)
from adapterhub.registry.remotes.oci.transfer import FileSlice
from adapterhub.registry.remotes.validate import parse_json

if TYPE_CHECKING:
    import requests

    from adapterhub.registry.remotes.dispatch import Endpoint

# Error answers, upload and tag answers, token answers: small JSON documents.
SMALL_BODY = 1 << 20


class _Retry(Exception):
    """The request should be sent again (after auth was set up)."""


class _Transient(Exception):
    """A connection error or a read timeout: worth another try."""


class Client:
    """A small OCI distribution client over ``requests``: auth, bounded retries, deadlines, errors mapped."""

    def __init__(self, host: str, *, insecure: bool = False, loopback: bool = False, username: str | None = None,
                 password: str | None = None, token: str | None = None) -> None:
        self.host = host
        self.base = f"{'http' if insecure or loopback else 'https'}://{host}"
        self.settings = Settings.from_env()
        self.session = session()
        self.watchdog = Watchdog()
        self.auth = Auth(host, self.base, username=username, password=password, token=token)
        self.retries = self.settings.retries
        self.requests = 0
        self.blob_bytes = 0  # blob bytes read whole or by range (a check of a remote base reports them)

    @property
    def timeout(self) -> float:
        return self.settings.timeout

    # -- requests -------------------------------------------------------------------

    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.base + path

    def _own(self, url: str) -> bool:
        return tuple(urlsplit(url)[:2]) == tuple(urlsplit(self.base)[:2])

    def _deadline_error(self, method: str, url: str) -> RemoteError:
        return RemoteError(
            f"{self.host} did not complete {method} {urlsplit(url).path} within the deadline "
            f"({self.settings.deadline:g} s, or a body slower than {self.settings.min_rate:g} bytes/s)",
            hint="the registry is too slow or stalled; ADAPTERHUB_REMOTE_DEADLINE and ADAPTERHUB_REMOTE_MIN_RATE set the limits",
        )

    def _send(self, method: str, url: str, headers: dict[str, str], data: Any) -> requests.Response:
        """One HTTP exchange under the watchdog; the response's body is not read yet (stream)."""
        import requests

        wd = self.watchdog
        wd.begin()
        size = len(data) if data is not None and hasattr(data, "__len__") else 0
        wd.arm(self.settings.deadline + (self.settings.body_time(size) if size else 0))
        with sending(wd):
            try:
                resp = self.session.request(method, url, headers=headers, data=data, stream=True,
                                            timeout=(self.timeout, self.timeout), allow_redirects=True)
            except requests.RequestException as e:
                wd.disarm()
                if wd.fired:
                    raise self._deadline_error(method, url) from None
                if isinstance(e, (requests.ConnectionError, requests.Timeout)):
                    raise _Transient(e) from None
                raise RemoteError(f"{method} {url} failed: {e}") from None
        self.requests += 1
        return resp

    def read_body(self, resp: requests.Response, limit: int, what: str) -> bytes:
        """The body of ``resp``, refused past ``limit`` bytes (never read whole first), within the deadline."""
        try:
            data = resp.raw.read(limit + 1, decode_content=True)
        except Exception as e:  # noqa: BLE001 - requests', urllib3's and http.client's errors alike
            if self.watchdog.fired:
                raise self._deadline_error(resp.request.method or "GET", resp.url) from None
            raise RemoteError(f"{what}: the answer broke off ({type(e).__name__})") from None
        finally:
            self.watchdog.disarm()
            resp.close()
        if self.watchdog.fired:
            raise self._deadline_error(resp.request.method or "GET", resp.url)
        if len(data) > limit:
            raise RemoteError(f"{what} is larger than {limit / 2**20:g} MiB",
                              hint="the registry sent far more than such an answer needs")
        return data

    def _headers(self, url: str, headers: dict[str, str] | None) -> dict[str, str]:
        """``headers`` with the credentials, which go to the registry's own host only."""
        out = dict(headers or {})
        if self._own(url):
            out.update(self.auth.header(self._fetch_token))
        return out

    def request(self, method: str, path: str, *, ok: tuple[int, ...] = (200,), headers: dict[str, str] | None = None,
                data: Any = None, stream: bool = False, repo: str | None = None, retry: bool = True,
                allow: tuple[int, ...] = ()) -> requests.Response:
        """Send with bounded retries on connection errors, 5xx and 429 (``Retry-After`` honoured); map errors to ours.

        ``allow`` lists statuses returned as they are (404 for HEAD, ...).
        A body that is not bytes (a streamed file) is never resent here. With
        ``stream`` the caller reads the body (``read_body``), else it is read
        here (up to :data:`SMALL_BODY`).
        """
        url = self.url(path)
        resend = retry and (data is None or isinstance(data, (bytes, bytearray)))
        # After a 401 the registry has taken none of the body: a file slice, read
        # afresh, goes again with the new token (a token may expire mid-push).
        resend_after_auth = resend or getattr(data, "resendable", False)
        attempts = (self.retries + 1) if resend else 1
        attempt = auth_rounds = 0
        fresh: set[str] = set()  # scopes a token was fetched for during this request
        while True:
            try:
                resp = self._send(method, url, self._headers(url, headers), data)
            except _Transient as e:
                attempt += 1
                if attempt >= attempts:
                    raise RemoteError(
                        f"cannot reach the registry at {self.base} ({type(e.args[0]).__name__}, {attempts} attempts)",
                        hint="check the URL and that the registry is up; ADAPTERHUB_REMOTE_TIMEOUT and "
                        "ADAPTERHUB_REMOTE_RETRIES tune the wait",
                    ) from None
                time.sleep(backoff(attempt))
                continue
            st = resp.status_code
            if st == 401:
                challenge = resp.headers.get("WWW-Authenticate", "")
                self.read_body(resp, SMALL_BODY, f"{self.host}: a 401 answer")
                auth_rounds += 1
                if auth_rounds <= 4 and self.auth.answer(challenge, self._fetch_token, fresh):
                    if not resend_after_auth:
                        raise _Retry()
                    continue
                raise self.auth.failure()
            if st in ok or st in allow:
                if not stream:
                    resp._content = self.read_body(resp, SMALL_BODY, f"{self.host}: the answer to {method}")
                return resp
            if st >= 500 or st == 429:
                wait = retry_after(resp.headers.get("Retry-After"))
                why = self._error_text(resp)[1]
                attempt += 1
                last = f"{self.host} answered {st} to {method} {urlsplit(resp.url).path}: {why}".rstrip(": ")
                if attempt >= attempts:
                    raise RemoteError(f"{last} (after {attempts} attempts)", hint="the registry is failing; retry later")
                if wait is not None and wait > self.settings.max_wait:
                    raise RemoteError(f"{last}; it asks to retry after {wait:.0f} s",
                                      hint="retry later; ADAPTERHUB_REMOTE_MAX_WAIT is the longest wait honoured")
                time.sleep(wait if wait is not None else backoff(attempt))
                continue
            self._raise(resp, method, repo)

    def _error_text(self, resp: requests.Response) -> tuple[str, str]:
        """(code, message) of an error answer: the first of the OCI ``errors``, else the start of the body."""
        try:
            body = self.read_body(resp, SMALL_BODY, f"{self.host}: an error answer")
        except RemoteError:
            return "", ""
        try:
            doc = parse_json(body, "an error answer", max_bytes=SMALL_BODY)
            errs = doc.get("errors") if isinstance(doc, dict) else None
            if isinstance(errs, list) and errs and isinstance(errs[0], dict):
                return str(errs[0].get("code", ""))[:100], str(errs[0].get("message", ""))[:300]
        except InvalidArtifactError:
            pass
        return "", body.decode("utf-8", "replace").strip()[:200]

    def _raise(self, resp: requests.Response, method: str, repo: str | None) -> None:
        st = resp.status_code
        code, msg = self._error_text(resp)
        where = f"{self.host}/{repo}" if repo else self.host
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

    def _fetch_token(self, realm: str, params: dict[str, str], basic: tuple[str, str] | None) -> dict[str, Any] | None:
        """GET a token from ``realm`` (whose host :class:`Auth` has allowed); None when the service refuses."""
        import base64

        url = realm + ("&" if "?" in realm else "?") + urlencode(params) if params else realm
        headers = {"Authorization": "Basic " + base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode()} if basic else {}
        for attempt in range(self.retries + 1):
            try:
                resp = self._send("GET", url, headers, None)
                break
            except _Transient as e:
                if attempt == self.retries:
                    raise RemoteError(f"cannot reach the token service {realm} ({type(e.args[0]).__name__})") from None
                time.sleep(backoff(attempt + 1))
        if resp.status_code != 200:
            self.read_body(resp, SMALL_BODY, f"the token service {realm}")
            return None
        body = self.read_body(resp, SMALL_BODY, f"the token service {realm}")
        try:
            doc = parse_json(body, f"the token service {realm}", max_bytes=SMALL_BODY)
        except InvalidArtifactError:
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
        if r.status_code not in (200, 206):
            self.read_body(r, SMALL_BODY, f"{self.host}/{repo}: {what}")
            data = b""
        else:
            try:
                data = self.read_body(r, limit, f"{self.host}/{repo}: {what} {digest[:19]}…")
                self.blob_bytes += len(data)
            except RemoteError as e:
                if "larger than" not in str(e):
                    raise
                raise InvalidArtifactError(f"{repo}: {what} {digest[:19]}… is larger than {limit / 2**20:g} MiB",
                                           hint="this is not an artifact adapterhub pushed") from None
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
            self.read_body(r, SMALL_BODY, f"{self.host}/{repo}: a 404 answer")
            return None
        where = f"{self.host}/{repo}:{reference}"
        try:
            data = self.read_body(r, media.MANIFEST_LIMIT, f"{where}: the manifest")
        except RemoteError as e:
            if "larger than" not in str(e):
                raise
            raise InvalidArtifactError(f"{where}: the manifest is larger than {media.MANIFEST_LIMIT / 2**20:g} MiB",
                                       hint="this is not an artifact adapterhub pushed") from None
        digest = sha256_digest(data)
        claimed = r.headers.get("Docker-Content-Digest")
        if (reference.startswith("sha256:") and digest != reference) or (claimed and claimed != digest):
            raise IntegrityError(f"{self.host}/{repo}: the manifest {reference} does not match its digest",
                                 hint="the registry (or something between) changed it; nothing was imported")
        media_type = r.headers.get("Content-Type", "").split(";")[0].strip()
        doc = parse_json(data, f"{where}: the manifest", max_bytes=media.MANIFEST_LIMIT)
        if not isinstance(doc, dict):
            raise InvalidArtifactError(f"{where} is not a JSON manifest")
        declared = doc.get("mediaType")
        return data, declared if isinstance(declared, str) and declared else media_type, digest

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
                self.read_body(r, SMALL_BODY, f"{self.host}/{repo}: a 404 answer")
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
        body = self.read_body(r, media.LISTING_LIMIT, f"{self.host}: the {key} listing")
        try:
            doc = parse_json(body, f"{self.host}: the {key} listing", max_bytes=media.LISTING_LIMIT)
        except InvalidArtifactError as e:
            raise RemoteError(str(e)) from None
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


def client_for(ep: Endpoint) -> Client:
    c = ep.creds
    return Client(ep.url.host, insecure=ep.insecure, loopback=ep.url.loopback, username=c.username,
                  password=c.password, token=c.token)

