"""The ``Registry`` facade: push, pull, resolve, tag, rm, gc, fsck, search.

>>> from adapterhub import Registry          # doctest: +SKIP
>>> reg = Registry()                          # $ADAPTERHUB_HOME or the user data dir
>>> v = reg.push("out/qa-lora", "team/qa-lora", tags=["prod"]).version
>>> reg.pull("team/qa-lora@prod", "/tmp/qa-lora")

Ordering rules that make the store crash-safe: blobs are made durable before
the index row that refers to them is committed, and blobs are deleted only
after the index rows that referred to them are gone, under an exclusive lock
that no push or pull holds at the same time. A ``kill -9`` at any point leaves
at worst unreferenced blobs or ``.incomplete`` temp files, which ``gc``
reclaims and ``fsck`` reports as reclaimable, not as damage.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from adapterhub import config
from adapterhub.artifact import Inspection
from adapterhub.fsutil import remove_stale_staging, staging_path
from adapterhub.fsutil import stale_staging as stale_staging_dirs
from adapterhub.errors import (
    ConflictError,
    IntegrityError,
    NotFoundError,
    StorageError,
    UnsafePathError,
)
from adapterhub.manifest import (
    FileEntry,
    Manifest,
    check_relpath,
    hash_file,
    list_files,
)
from adapterhub.refs import Ref, check_tag, parse_target

from adapterhub.registry.blobs import (
    BlobStore,
    fsync_dir,
    storage_error,
    write_atomic,
)
from adapterhub.registry.index import Index, VersionInfo

if TYPE_CHECKING:
    from adapterhub.registry.remotes.oci import StagedLeftover

LOCK_TIMEOUT_S = 600.0  # default of $ADAPTERHUB_LOCK_TIMEOUT
LOCK_NOTICE_AFTER_S = 1.0  # a wait longer than this is announced on stderr
_LATEST_IS_MANAGED = "`latest` is managed by adapterhub and cannot be set or removed by hand"
_LATEST_HINT = "`latest` moves to every new version; use another tag (prod, stable, ...) to pin one"
HF_IMPORT_DIR = "hf-import"  # Hub imports stage in .hf-import.<pid>-<hex>.incomplete


class Progress(Protocol):
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...


ProgressFactory = Callable[[str, int], Progress]


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _no_progress(desc: str, total: int) -> Progress:
    return _NoProgress()


def lock_timeout() -> float:
    """Seconds to wait for the registry lock: ``$ADAPTERHUB_LOCK_TIMEOUT``, else 600."""
    try:
        return max(0.0, float(os.environ.get("ADAPTERHUB_LOCK_TIMEOUT", LOCK_TIMEOUT_S)))
    except ValueError:
        return LOCK_TIMEOUT_S


def lock_holders(path: Path) -> list[int]:
    """Pids holding a flock on ``path``, from Linux's /proc/locks (empty where unknown)."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return []
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = set()
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 4242 08:01:1234 0 EOF"; waiters have "->" after the id.
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == dev and fields[4].isdigit():
            pids.add(int(fields[4]))
    pids.discard(os.getpid())
    pids.discard(0)  # a holder in another pid namespace
    return sorted(pids)


def _stderr_notice(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class PushResult:
    name: str
    version: str
    digest: str
    created: bool  # False: identical content was already there
    size: int
    file_count: int
    bytes_written: int  # new blob bytes; 0 for a re-push
    tags: tuple[str, ...]
    inspection: Inspection
    seconds: float

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "name": self.name,
            "version": self.version,
            "digest": self.digest,
            "created": self.created,
            "size": self.size,
            "file_count": self.file_count,
            "bytes_written": self.bytes_written,
            "tags": list(self.tags),
            "kind": self.inspection.kind,
            "method": self.inspection.method,
            "base_model": self.inspection.base_model,
            "rank": self.inspection.rank,
            "quant": self.inspection.quant,
            "warnings": list(self.inspection.warnings),
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class PullResult:
    ref: str
    digest: str
    dest: Path
    files: tuple[FileEntry, ...]
    size: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "digest": self.digest,
            "dest": str(self.dest),
            "files": [f.to_dict() for f in self.files],
            "size": self.size,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class RemovePlan:
    """What ``rm``/``gc`` will delete. Built first, printed, then executed."""

    versions: tuple[tuple[str, str], ...]  # (name, version)
    blobs: tuple[tuple[str, int], ...]  # (sha256, size) no longer referenced afterwards
    temp_files: tuple[str, ...] = ()
    staging: tuple[StagedLeftover, ...] = ()  # stale partial downloads of remote pulls
    staging_busy: bool = False  # a remote pull holds the staging area: left alone
    dependents: tuple[str, ...] = ()  # refs derived (merged, quantized, ...) from content that goes

    @property
    def dependents_warning(self) -> str | None:
        """Removing content others were derived from is allowed, but worth saying."""
        if not self.dependents:
            return None
        n = len(self.dependents)
        what = "it" if len(self.versions) == 1 else "them"
        return (
            f"{n} artifact{'s were' if n != 1 else ' was'} derived from {what}: {', '.join(self.dependents)}; "
            f"{'their' if n != 1 else 'its'} lineage will point at a digest that is no longer here"
        )

    @property
    def freed_bytes(self) -> int:
        return sum(size for _, size in self.blobs) + sum(s.freed for s in self.staging)

    def to_dict(self) -> dict[str, Any]:
        return {
            "versions": [f"{n}:{v}" for n, v in self.versions],
            "blobs": [{"sha256": s, "size": n} for s, n in self.blobs],
            "temp_files": list(self.temp_files),
            "staging": [{"path": str(s.path), "size": s.freed} for s in self.staging],
            "staging_busy": self.staging_busy,
            "freed_bytes": self.freed_bytes,
            "dependents": list(self.dependents),
        }


@dataclass(frozen=True)
class FsckReport:
    problems: tuple[str, ...]
    blobs_checked: int
    bytes_checked: int
    unreferenced: tuple[str, ...] = ()  # reclaimable by gc, not damage
    temp_files: tuple[str, ...] = ()
    staging: tuple[str, ...] = ()  # stale partial downloads of remote pulls, reclaimable by gc

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problems": list(self.problems),
            "blobs_checked": self.blobs_checked,
            "bytes_checked": self.bytes_checked,
            "unreferenced_blobs": list(self.unreferenced),
            "temp_files": list(self.temp_files),
            "staging": list(self.staging),
        }


@dataclass
class ShowInfo:
    version: VersionInfo
    inspection: dict[str, Any]
    files: list[FileEntry] = field(default_factory=list)
    lineage: list[dict[str, Any]] = field(default_factory=list)
    signatures: list[dict[str, Any]] = field(default_factory=list)
    other_versions: list[str] = field(default_factory=list)  # same content under other versions
    verification: dict[str, Any] | None = None  # the newest numerical verification record

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.version.to_dict(),
            "inspection": self.inspection,
            "files": [f.to_dict() for f in self.files],
            "lineage": self.lineage,
            "signatures": self.signatures,
            "same_content_as": self.other_versions,
            "verification": self.verification,
        }


class Registry:
    """A local registry rooted at ``home`` (default: ``adapterhub.config.home()``)."""

    # Called once when the registry lock has been waited for a second; None: silent.
    on_lock_wait: Callable[[str], None] | None = staticmethod(_stderr_notice)

    def __init__(self, home: str | os.PathLike | None = None, *, create: bool = True) -> None:
        self.home = Path(home) if home is not None else config.home()
        if create:
            try:
                self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
                (self.home / "blobs").mkdir(exist_ok=True)
            except OSError as e:
                raise storage_error(e, str(self.home)) from e
        elif not (self.home / "index.db").exists():
            raise NotFoundError(f"no registry at {self.home}")
        self.blobs = BlobStore(self.home / "blobs")
        self.index = Index(self.home / "index.db", create=create)

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- locking --------------------------------------------------------------

    @contextmanager
    def _lock(self, exclusive: bool) -> Iterator[None]:
        """Pushes and pulls share the lock; deleting blobs takes it alone."""
        path = self.home / "registry.lock"
        with open(path, "a") as fh:
            op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            timeout = lock_timeout()
            start = time.monotonic()
            announced = False
            while True:
                try:
                    fcntl.flock(fh, op | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    waited = time.monotonic() - start
                    if waited > timeout:
                        raise StorageError(
                            f"the registry is locked by another adapterhub process{_pids(path)}",
                            hint=f"retry when it has finished (waited {timeout:g} s; ADAPTERHUB_LOCK_TIMEOUT sets the wait)",
                        ) from None
                    if not announced and waited >= LOCK_NOTICE_AFTER_S:
                        announced = True
                        if self.on_lock_wait is not None:
                            self.on_lock_wait(
                                f"waiting for another adapterhub process{_pids(path)} to release the registry lock"
                                f" (up to {timeout:g} s)…"
                            )
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- push / pull ----------------------------------------------------------

    def push(
        self,
        path: str | os.PathLike,
        target: str,
        *,
        tags: Sequence[str] = (),
        description: str | None = None,
        progress: ProgressFactory | None = None,
        inspection: Inspection | None = None,
        derived_from: Sequence[tuple[str, str]] = (),
        recipe: dict[str, Any] | None = None,
        verified: Mapping[str, str] | None = None,
    ) -> PushResult:
        """Store the artifact at ``path`` as ``target`` (``name`` or ``name:version``).

        ``derived_from`` lists ``(parent digest, relation)`` pairs (relation:
        ``adapter``, ``base`` or ``source``) and ``recipe`` says how the
        artifact was made; both land in the lineage table with the version.
        ``verified`` maps relative paths to the sha256 the caller has already
        checked (a remote pull hashes while it downloads): those files are
        not hashed again, and enter the store by hard link.
        """
        from adapterhub.inspect import inspect_path

        t0 = time.perf_counter()
        name, version = parse_target(target)
        tags = tuple(check_tag(t) for t in tags)
        if "latest" in tags:
            tags = tuple(t for t in tags if t != "latest")
        progress = progress or _no_progress
        path = Path(path)
        ins = inspection or inspect_path(path)  # refuses non-artifacts before any hashing
        files = [(rel, p, os.stat(p).st_size) for rel, p in list_files(path)]
        # Content of a size no stored file has cannot be in the store: it is
        # hashed while it is copied (one read). Other files are hashed first,
        # so identical content is never written again.
        known_sizes = self.index.file_sizes({size for _, _, size in files})
        seen: set[int] = set()
        one_pass = set()
        for rel, _, size in files:
            if size not in known_sizes and size not in seen and size > 0:
                one_pass.add(rel)
            seen.add(size)
        digests: dict[str, str] = dict(verified or {})
        one_pass -= set(digests)
        written = 0
        bar = progress(f"hashing {path.name}", sum(size for rel, _, size in files if rel not in one_pass and rel not in digests))
        try:
            for rel, p, _ in files:
                if rel not in one_pass and rel not in digests:
                    digests[rel] = hash_file(p, bar.update)
        finally:
            bar.close()
        with self._lock(exclusive=False):
            # Checked under the lock: gc cannot delete a blob between this
            # check and the index row that will refer to it.
            todo = [(rel, p, size) for rel, p, size in files if rel in one_pass or not self.blobs.has(digests[rel], size)]
            if todo:
                bar = progress(f"storing {path.name}", sum(size for _, _, size in todo))
                try:
                    for rel, p, size in todo:
                        if rel in one_pass:
                            digests[rel], new = self.blobs.put_new(p, bar.update)
                        elif verified and rel in verified:
                            new = self.blobs.adopt(p, digests[rel], size, bar.update)
                        else:
                            new = self.blobs.put(p, digests[rel], size, bar.update)
                        written += size if new else 0
                finally:
                    bar.close()
            manifest = Manifest.from_entries(FileEntry(rel, size, digests[rel]) for rel, _, size in files)
            info, created = self.index.add_version(
                name, version, manifest, ins, description=description, tags=tags,
                derived_from=derived_from, recipe=recipe,
            )
        return PushResult(
            name=info.name,
            version=info.version,
            digest=info.digest,
            created=created,
            size=manifest.size,
            file_count=len(manifest),
            bytes_written=written,
            tags=info.tags,
            inspection=ins,
            seconds=time.perf_counter() - t0,
        )

    def resolve(self, ref: str | Ref) -> VersionInfo:
        return self.index.resolve(Ref.parse(ref) if isinstance(ref, str) else ref)

    def files(self, ref: str | Ref) -> list[tuple[FileEntry, Path]]:
        """Each file of ``ref`` with the path of its blob, to read in place (no copy)."""
        info = self.resolve(ref)
        return [(f, self.blobs.path(f.sha256)) for f in self.index.files(info.digest)]

    def pull(
        self,
        ref: str | Ref,
        dest: str | os.PathLike,
        *,
        force: bool = False,
        progress: ProgressFactory | None = None,
        on_staged: Callable[[Path, VersionInfo, list[FileEntry], bool], None] | None = None,
    ) -> PullResult:
        """Write the files of ``ref`` into ``dest``, re-hashing every byte on the way out.

        ``dest`` must not exist or be empty; the files are staged beside it and
        renamed into place at the end, so a failed pull leaves nothing behind.
        With ``force``, files are written into an existing ``dest`` one by one,
        each atomically, and other files there are left alone.

        ``on_staged(root, version, files, staged)`` runs once every file is
        written and re-hashed, before the rename into ``dest`` (``staged`` is
        False when ``root`` is ``dest`` itself, with ``force``). It may add
        files (a signature) or raise to abort: a staged pull then leaves
        nothing behind. Signature checks and trust policy use it.
        """
        t0 = time.perf_counter()
        info = self.resolve(ref)
        entries = self.index.files(info.digest)
        dest = Path(dest)
        nonempty = dest.is_dir() and any(dest.iterdir())
        if dest.exists() and not dest.is_dir():
            raise ConflictError(f"{dest} exists and is not a directory")
        if nonempty and not force:
            raise ConflictError(f"{dest} is not empty", hint="pass --force to write into it anyway")
        progress = progress or _no_progress
        bar = progress(f"pulling {info.name}:{info.version}", sum(f.size for f in entries))
        staging: Path | None = None
        try:
            with self._lock(exclusive=False):
                if force and dest.is_dir():
                    root = dest
                else:
                    try:
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        remove_stale_staging(dest)  # left by a killed pull
                        staging = staging_path(dest)
                        staging.mkdir()
                    except OSError as e:
                        raise storage_error(e, str(dest)) from e
                    root = staging
                real_root = root.resolve()
                for f in entries:
                    target = root / check_relpath(f.path)
                    try:
                        target.parent.mkdir(parents=True, exist_ok=True)
                    except OSError as e:
                        raise storage_error(e, str(target.parent)) from e
                    if real_root not in target.parent.resolve().parents and target.parent.resolve() != real_root:
                        raise UnsafePathError(f"{dest}/{f.path} would be written outside {dest} (symlink)")
                    blob = self.blobs.path(f.sha256)
                    if not blob.exists():
                        raise IntegrityError(
                            f"the blob for {f.path} is missing from the registry", hint="run `adapterhub fsck`"
                        )
                    try:
                        write_atomic(target, blob, mode=0o644, expected_sha256=f.sha256, progress=bar.update)
                    except IntegrityError:
                        raise IntegrityError(
                            f"{f.path}: the stored blob does not match its sha256 {f.sha256[:12]}…",
                            hint="the registry store is damaged; run `adapterhub fsck`",
                        ) from None
                if on_staged is not None:
                    on_staged(root, info, entries, staging is not None)
            if staging is not None:
                try:
                    if dest.is_dir():
                        dest.rmdir()  # empty, checked above
                    os.rename(staging, dest)
                    staging = None
                    fsync_dir(dest.parent)
                except OSError as e:
                    raise storage_error(e, str(dest)) from e
        finally:
            bar.close()
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        return PullResult(
            ref=f"{info.name}:{info.version}",
            digest=info.digest,
            dest=dest,
            files=tuple(entries),
            size=sum(f.size for f in entries),
            seconds=time.perf_counter() - t0,
        )

    # -- signatures ------------------------------------------------------------

    def add_signature(self, digest: str, bundle: bytes, key_id: str, *, kind: str = "model") -> str:
        """Store a signature bundle as a blob tied to ``digest``; returns the blob's sha256 hex.

        ``kind`` is ``model`` (an OpenSSF model-signing bundle over the files)
        or ``provenance`` (an adapterhub provenance attestation). An artifact
        may carry several of each.
        """
        import hashlib
        import tempfile

        from adapterhub.registry.index import now

        sha = hashlib.sha256(bundle).hexdigest()
        with self._lock(exclusive=False):
            if not self.blobs.has(sha, len(bundle)):
                fd, tmp = tempfile.mkstemp(prefix=".sig-", suffix=".incomplete", dir=self.home)
                try:
                    with os.fdopen(fd, "wb") as fh:
                        fh.write(bundle)
                    self.blobs.put(tmp, sha, len(bundle))
                finally:
                    os.unlink(tmp)
            with self.index.write():
                if not self.index.conn.execute("select 1 from artifacts where digest = ?", (digest,)).fetchone():
                    raise NotFoundError(f"unknown artifact {digest}")
                self.index.conn.execute(
                    "insert into signatures (digest, blob, key_id, kind, created_at) values (?, ?, ?, ?, ?) "
                    "on conflict(digest, blob) do nothing",
                    (digest, sha, key_id, kind, now()),
                )
        return sha

    # -- numerical verification -------------------------------------------------

    def add_verification(self, digest: str, report: dict[str, Any]) -> int:
        """Store a verification report (``adapterhub.verify.VerifyReport.to_dict()``) for ``digest``."""
        import json

        from adapterhub.registry.index import now

        with self.index.write():
            if not self.index.conn.execute("select 1 from artifacts where digest = ?", (digest,)).fetchone():
                raise NotFoundError(f"unknown artifact {digest}")
            cur = self.index.conn.execute(
                "insert into verifications (digest, verdict, format, device, report, created_at) values (?, ?, ?, ?, ?, ?)",
                (digest, report.get("verdict"), report.get("format"), report.get("device"),
                 json.dumps(report, sort_keys=True, default=str), report.get("created_at") or now()),
            )
        return int(cur.lastrowid or 0)

    def latest_verification(self, digest: str) -> dict[str, Any] | None:
        """The newest verification of ``digest``, summarised (``show``, signed provenance)."""
        return _verification_summary(self.index.verifications(digest, limit=1))

    def verifications(self, digest: str) -> list[dict[str, Any]]:
        """Verification records of ``digest``, newest first: id, verdict, format, device, report, created_at."""
        return self.index.verifications(digest)

    def signatures(self, digest: str, kind: str | None = None) -> list[dict[str, Any]]:
        """Signature rows of ``digest``, newest first: blob, key_id, kind, created_at."""
        sql = "select blob, key_id, kind, created_at from signatures where digest = ?"
        args: list[Any] = [digest]
        if kind is not None:
            sql += " and kind = ?"
            args.append(kind)
        rows = self.index.conn.execute(sql + " order by created_at desc, rowid desc", args).fetchall()
        return [{"blob": b, "key_id": k, "kind": kd, "created_at": c} for b, k, kd, c in rows]

    def read_signature(self, blob: str) -> bytes:
        """A signature bundle's bytes, re-hashed: a tampered blob is an IntegrityError."""
        import hashlib

        p = self.blobs.path(blob)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"signature blob {blob[:12]}… is missing from the registry", hint="run `adapterhub fsck`") from None
        if hashlib.sha256(data).hexdigest() != blob:
            raise IntegrityError(
                f"signature blob {blob[:12]}… is corrupt: it does not match its sha256",
                hint="the registry store is damaged; run `adapterhub fsck`",
            )
        return data

    # -- queries --------------------------------------------------------------

    def ls(self, name: str | None = None) -> list[VersionInfo]:
        if name is not None:
            from adapterhub.refs import check_name

            versions = self.index.versions(check_name(name))
            if not versions:
                raise NotFoundError(f"unknown name {name!r}")
            return versions
        return self.index.versions()

    def search(self, text: str | None = None, *, derived_from: str | Ref | None = None, **filters: Any) -> list[VersionInfo]:
        """Versions matching ``text`` and filters; ``derived_from`` takes a ref
        and keeps its descendants (merged, quantized, ...) at any depth."""
        digest = self.resolve(derived_from).digest if derived_from is not None else None
        return self.index.search(text, derived_from=digest, **filters)

    def show(self, ref: str | Ref) -> ShowInfo:
        info = self.resolve(ref)
        conn = self.index.conn
        lineage = [
            {"parent": e["digest"], "parent_refs": self.index.refs_of(e["digest"]), **{k: e[k] for k in ("relation", "recipe", "created_at")}}
            for e in self.index.parents(info.digest)
        ]
        sigs = [
            {"blob": b, "key_id": k, "kind": kind, "created_at": c}
            for b, k, kind, c in conn.execute(
                "select blob, key_id, kind, created_at from signatures where digest = ? order by created_at",
                (info.digest,),
            )
        ]
        others = [
            f"{n}:{v}"
            for n, v in conn.execute(
                "select name, version from versions where digest = ? and not (name = ? and version = ?)",
                (info.digest, info.name, info.version),
            )
        ]
        return ShowInfo(
            version=info,
            inspection=self.index.inspection(info.digest),
            files=self.index.files(info.digest),
            lineage=lineage,
            signatures=sigs,
            other_versions=others,
            verification=self.latest_verification(info.digest),
        )

    def lineage(self, ref: str | Ref, *, max_depth: int = 16) -> dict[str, Any]:
        """The version's ancestors (``up``) and descendants (``down``) as trees."""
        info = self.resolve(ref)

        def node(digest: str, relation: str | None, recipe: Any, direction: str, depth: int, seen: frozenset[str]) -> dict[str, Any]:
            n: dict[str, Any] = {"digest": digest, "refs": self.index.refs_of(digest)}
            if relation:
                n["relation"] = relation
            if recipe:
                n["recipe"] = recipe
            if depth < max_depth and digest not in seen:
                edges = self.index.parents(digest) if direction == "up" else self.index.children(digest)
                n[direction] = [
                    node(e["digest"], e["relation"], e["recipe"], direction, depth + 1, seen | {digest})
                    for e in edges
                ]
            return n

        return {
            "ref": f"{info.name}:{info.version}",
            "digest": info.digest,
            "up": node(info.digest, None, None, "up", 0, frozenset()).get("up", []),
            "down": node(info.digest, None, None, "down", 0, frozenset()).get("down", []),
        }

    def tag(self, ref: str | Ref, tag: str) -> VersionInfo:
        if tag == "latest":
            raise ConflictError(_LATEST_IS_MANAGED, hint=_LATEST_HINT)
        return self.index.set_tag(Ref.parse(ref) if isinstance(ref, str) else ref, check_tag(tag))

    def untag(self, name: str, tag: str) -> None:
        if tag == "latest":
            raise ConflictError(_LATEST_IS_MANAGED, hint=_LATEST_HINT)
        self.index.remove_tag(name, check_tag(tag))

    # -- deleting -------------------------------------------------------------

    def plan_rm(self, ref: str | Ref, *, all_versions: bool = False) -> RemovePlan:
        if all_versions:
            from adapterhub.refs import check_name

            name = check_name(str(ref))
            versions = [(v.name, v.version) for v in self.index.versions(name)]
            if not versions:
                raise NotFoundError(f"unknown name {name!r}")
        else:
            info = self.resolve(ref)
            versions = [(info.name, info.version)]
        conn = self.index.conn
        gone = set(versions)
        keep_digests = {
            d for n, v, d in conn.execute("select name, version, digest from versions") if (n, v) not in gone
        }
        drop_digests = {
            d for n, v, d in conn.execute("select name, version, digest from versions") if (n, v) in gone
        } - keep_digests
        keep_blobs = set()
        for d in keep_digests:
            keep_blobs.update(s for (s,) in conn.execute("select sha256 from files where digest = ?", (d,)))
        blobs: dict[str, int] = {}
        for d in drop_digests:
            for s, size in conn.execute("select sha256, size from files where digest = ?", (d,)):
                if s not in keep_blobs:
                    blobs[s] = size
        # Children that stay keep their lineage rows, now pointing at a digest
        # that is gone: allowed, but the plan says so.
        dependents = sorted(
            {
                ref
                for d in drop_digests
                for child in self.index.children(d)
                if child["digest"] not in drop_digests
                for ref in self.index.refs_of(child["digest"])
                if tuple(ref.rsplit(":", 1)) not in gone
            }
        )
        return RemovePlan(tuple(versions), tuple(sorted(blobs.items())), dependents=tuple(dependents))

    def execute_rm(self, plan: RemovePlan) -> RemovePlan:
        """Delete index rows first, then blobs nothing refers to any more."""
        self.index.remove_versions(plan.versions)
        self._delete_unreferenced({s for s, _ in plan.blobs})
        return plan

    def plan_gc(self, staging_max_age_s: float | None = None) -> RemovePlan:
        """Unreferenced blobs, temp files, and remote downloads untouched for
        ``staging_max_age_s`` (default: a day) that no running pull holds."""
        from adapterhub.registry.remotes.oci import STAGING_MAX_AGE_S, stale_staging

        referenced = self.index.referenced_blobs()
        blobs = tuple((b.sha256, b.size) for b in self.blobs if b.sha256 not in referenced)
        # Blob temp files, and work dirs of Hub imports whose process is gone.
        temps = tuple(str(p) for p in self.blobs.temp_files()) + tuple(
            str(p) for p in stale_staging_dirs(self.home / HF_IMPORT_DIR)
        )
        age = STAGING_MAX_AGE_S if staging_max_age_s is None else staging_max_age_s
        staged, busy = stale_staging(self, age)
        return RemovePlan((), blobs, temps, tuple(staged), busy)

    def execute_gc(self, plan: RemovePlan) -> RemovePlan:
        from adapterhub.registry.remotes.oci import remove_staging

        with self._lock(exclusive=True):
            # No push or pull runs now, so every temp file is a leftover.
            for p in self.blobs.temp_files():
                p.unlink(missing_ok=True)
            remove_stale_staging(self.home / HF_IMPORT_DIR)  # re-checks that their process is gone
        # Under the pull lock (never waited for): a pull that started since
        # the plan keeps its files.
        remove_staging(self, plan.staging)
        self._delete_unreferenced({s for s, _ in plan.blobs})
        return plan

    def _delete_unreferenced(self, candidates: set[str]) -> None:
        if not candidates:
            return
        with self._lock(exclusive=True):
            # Re-read under the lock: a push may have referenced a blob since the plan.
            referenced = self.index.referenced_blobs()
            for sha in sorted(candidates - referenced):
                self.blobs.remove(sha)

    # -- checking -------------------------------------------------------------

    def fsck(self, progress: ProgressFactory | None = None) -> FsckReport:
        """Re-hash every blob and cross-check the index against the store."""
        problems = list(self.index.check())
        referenced: dict[str, list[str]] = {}
        conn = self.index.conn
        for digest, path, sha in conn.execute("select digest, path, sha256 from files"):
            referenced.setdefault(sha, []).append(path)
        for (sha,) in conn.execute("select blob from signatures"):
            referenced.setdefault(sha, []).append("(signature)")
        stored = {b.sha256: b for b in self.blobs}
        total = sum(b.size for s, b in stored.items() if s in referenced)
        bar = (progress or _no_progress)("checking blobs", total)
        checked = 0
        nbytes = 0
        try:
            for sha in sorted(referenced):
                b = stored.get(sha)
                users = ", ".join(sorted(set(referenced[sha]))[:3])
                if b is None:
                    problems.append(f"blob {sha} is missing (used by {users})")
                    continue
                got = hash_file(b.path, bar.update)
                checked += 1
                nbytes += b.size
                if got != sha:
                    problems.append(f"blob {sha} is corrupt: its content hashes to {got} (used by {users})")
        finally:
            bar.close()
        unreferenced = tuple(sorted(s for s in stored if s not in referenced))
        temps = tuple(sorted(str(p) for p in self.blobs.temp_files())) + tuple(
            str(p) for p in stale_staging_dirs(self.home / HF_IMPORT_DIR)
        )
        from adapterhub.registry.remotes.oci import stale_staging

        staged = tuple(str(s.path) for s in stale_staging(self)[0])
        return FsckReport(tuple(problems), checked, nbytes, unreferenced, temps, staged)


def _pids(path: Path) -> str:
    pids = lock_holders(path)
    return f" (pid {', '.join(map(str, pids))})" if pids else ""


_SUMMARY_METRICS = ("rel", "cos_min", "kl_mean", "top1", "max_abs")


def _verification_summary(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The newest verification record, without the bulky per-layer and decode details."""
    if not rows:
        return None
    r = rows[0]
    rep = r["report"]
    metrics = rep.get("metrics") or {}
    out = {
        "verdict": r["verdict"],
        "format": r["format"],
        "device": r["device"],
        "created_at": r["created_at"],
        "metrics": {k: metrics.get(k) for k in _SUMMARY_METRICS},
        "tolerance": rep.get("tolerance"),
        "failures": rep.get("failures") or [],
    }
    same = rep.get("same_recipe") or {}
    if same.get("metrics"):
        # Quantized candidates: the comparison with base + adapter quantized the same way.
        out["same_recipe"] = {
            "verdict": same.get("verdict"),
            "metrics": {k: same["metrics"].get(k) for k in _SUMMARY_METRICS},
        }
    return out
