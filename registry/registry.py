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

import itertools
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from adapterhub import config
from adapterhub.artifact import Inspection
from adapterhub.errors import ConflictError, InvalidNameError, NotFoundError
from adapterhub.fsutil import staging_path, storage_error
from adapterhub.manifest import FileEntry
from adapterhub.progress import Progress, ProgressFactory
from adapterhub.refs import LEGACY_VERSION_RE, Ref, check_name, check_tag
from adapterhub.registry import maintenance, records, signatures, verifications
from adapterhub.registry import pull as _pull
from adapterhub.registry import push as _push
from adapterhub.registry.blobs import BlobStore
from adapterhub.registry.index import Index, VersionInfo
from adapterhub.registry.locking import LOCK_NOTICE_AFTER_S, LOCK_TIMEOUT_S, lock_holders, lock_timeout, registry_lock
from adapterhub.registry.maintenance import HF_IMPORT_DIR, FsckReport, RemovePlan
from adapterhub.registry.pull import OnStaged, PullResult
from adapterhub.registry.push import PushResult
from adapterhub.registry.rebuild import RebuildReport, index_lost, lost_error, rebuild

__all__ = [
    "HF_IMPORT_DIR",
    "LOCK_NOTICE_AFTER_S",
    "LOCK_TIMEOUT_S",
    "FsckReport",
    "Progress",
    "ProgressFactory",
    "PullResult",
    "PushResult",
    "Registry",
    "RemovePlan",
    "ShowInfo",
    "lock_holders",
    "lock_timeout",
]

_LATEST_IS_MANAGED = "`latest` is managed by adapterhub and cannot be set or removed by hand"
_LATEST_HINT = "`latest` moves to every new version; use another tag (prod, stable, ...) to pin one"


class _ClosedIndex:
    """Stands for the index a rebuild is about to replace (it cannot be opened)."""

    def close(self) -> None:
        pass


def _stderr_notice(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


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
        self.blobs = BlobStore(self.home / "blobs")
        # An empty or missing index beside a non-empty store is a lost index, not
        # a new registry: opening it would call every blob garbage (issue 16, item 3).
        if index_lost(self.home, self.blobs):
            raise lost_error(self.home)
        if create:
            try:
                self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
                (self.home / "blobs").mkdir(exist_ok=True)
            except OSError as e:
                raise storage_error(e, str(self.home)) from e
        elif not (self.home / "index.db").exists():
            raise NotFoundError(f"no registry at {self.home}")
        self.index = Index(self.home / "index.db", create=create)
        self.records = BlobStore(self.home / "records")
        self.index.record_store = self.records

    @classmethod
    def rebuild_index(cls, home: str | os.PathLike | None = None) -> tuple[Registry, RebuildReport]:
        """Rebuild a lost or damaged ``index.db`` from the record blobs in the store.

        The old index is kept beside it as ``index.db.damaged-<time>`` (an
        empty one is removed). Returns the registry on the new index, and
        what was restored and skipped.
        """
        self = cls.__new__(cls)
        self.home = Path(home) if home is not None else config.home()
        self.blobs = BlobStore(self.home / "blobs")
        self.records = BlobStore(self.home / "records")
        if not (self.home / "blobs").is_dir():
            raise NotFoundError(f"no registry at {self.home}")
        with self._lock(exclusive=True):
            self.index = _ClosedIndex()  # type: ignore[assignment]
            report = rebuild(self)
        return self, report

    def staging_dir(self, purpose: str) -> Path:
        """A new private work directory in the home, ``.<purpose>.<pid>-<hex>.incomplete``.

        The caller removes it when done. If the process is killed first, the
        pid in its name tells ``fsck`` (reclaimable) and ``gc`` (removed) that
        nobody owns it any more: conversions that push (``merge --push``) and
        signing stage their work here.
        """
        path = staging_path(self.home / purpose)
        try:
            path.mkdir(mode=0o700)
        except OSError as e:
            raise storage_error(e, str(path)) from e
        return path

    def write_records(self) -> int:
        """Write record blobs for what an older registry holds without them; return how many."""
        return records.write_all(self.index)

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _lock(self, exclusive: bool) -> Iterator[None]:
        """Pushes and pulls share the lock; deleting blobs takes it alone."""
        with registry_lock(self.home, exclusive, self.on_lock_wait):
            yield

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
        move_latest: bool = True,
    ) -> PushResult:
        """Store the artifact at ``path`` as ``target`` (``name`` or ``name:version``).

        ``derived_from`` lists ``(parent digest, relation)`` pairs (relation:
        ``adapter``, ``base`` or ``source``) and ``recipe`` says how the
        artifact was made; both land in the lineage table with the version.
        ``verified`` maps relative paths to the sha256 the caller has already
        checked (a remote pull hashes while it downloads): those files are
        not hashed again, and enter the store by hard link. ``move_latest=False``
        leaves an existing ``latest`` where it is (a remote import moves no tag).
        """
        return _push.push(
            self, path, target, tags=tags, description=description, progress=progress, inspection=inspection,
            derived_from=derived_from, recipe=recipe, verified=verified, move_latest=move_latest,
        )

    def resolve(self, ref: str | Ref) -> VersionInfo:
        if isinstance(ref, Ref):
            return self.index.resolve(ref)
        try:
            parsed = Ref.parse(ref)
        except InvalidNameError:
            found = self._resolve_not_a_version(ref)
            if found is None:
                raise
            return found
        return self.index.resolve(parsed)

    def _resolve_not_a_version(self, text: str) -> VersionInfo | None:
        """``NAME:WORD`` where WORD is no version: a version stored before versions had
        to start with a digit, or else a tag, which the error then names."""
        name, sep, word = text.rpartition(":")
        if not sep or "@" in text or not LEGACY_VERSION_RE.fullmatch(word):
            return None
        try:
            check_name(name)
        except InvalidNameError:
            return None
        try:
            return self.index.get_version(name, word)
        except NotFoundError:
            pass
        try:
            tagged = self.index.resolve(Ref(name, tag=word))
        except NotFoundError:
            return None
        raise InvalidNameError(
            f"{word!r} is a tag of {name} (pointing at {name}:{tagged.version}), not a version",
            hint=f"name a tag with '@': {name}@{word}",
        )

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
        on_staged: OnStaged | None = None,
        link: bool = False,
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

        With ``link``, ``dest`` is made in O(files) with no data copied:
        reflinks of the blobs (copy-on-write, where the filesystem supports
        them), else hard links to the read-only blobs, which must never be
        edited in place (``fsck`` would report the blob as corrupt).
        ``PullResult.materialized`` says which.
        """
        return _pull.pull(self, ref, dest, force=force, progress=progress, on_staged=on_staged, link=link)

    # -- signatures ------------------------------------------------------------

    def add_signature(self, digest: str, bundle: bytes, key_id: str, *, kind: str = "model") -> str:
        """Store a signature bundle as a blob tied to ``digest``; returns the blob's sha256 hex.

        ``kind`` is ``model`` (an OpenSSF model-signing bundle over the files)
        or ``provenance`` (an adapterhub provenance attestation). An artifact
        may carry several of each.
        """
        return signatures.store(self, digest, bundle, key_id, kind)

    def signatures(self, digest: str, kind: str | None = None) -> list[dict[str, Any]]:
        """Signature rows of ``digest``, newest first: blob, key_id, kind, created_at."""
        return [r.to_dict() for r in signatures.rows(self.index, digest, kind)]

    def read_signature(self, blob: str) -> bytes:
        """A signature bundle's bytes, re-hashed: a tampered blob is an IntegrityError."""
        return signatures.read(self, blob)

    # -- numerical verification -------------------------------------------------

    def add_verification(self, digest: str, report: dict[str, Any]) -> int:
        """Store a verification report (``adapterhub.verify.VerifyReport.to_dict()``) for ``digest``."""
        return verifications.add(self.index, digest, report)

    def latest_verification(self, digest: str) -> dict[str, Any] | None:
        """The newest verification of ``digest``, summarised (``show``, signed provenance)."""
        return verifications.latest_summary(self.index, digest)

    def verifications(self, digest: str) -> list[dict[str, Any]]:
        """Verification records of ``digest``, newest first: id, verdict, format, device, report, created_at."""
        return verifications.rows(self.index, digest)

    # -- queries --------------------------------------------------------------

    def ls(self, name: str | None = None, *, limit: int | None = None) -> list[VersionInfo]:
        """Every version (of ``name``), by name then push order; at most ``limit`` (a page)."""
        if name is not None:
            versions = self.index.versions(check_name(name), limit)
            if not versions:
                raise NotFoundError(f"unknown name {name!r}")
            return versions
        return self.index.versions(None, limit)

    def ls_rows(self, name: str | None = None, *, limit: int | None = None, brief: bool = False) -> Iterator[tuple[Any, ...]]:
        """As :meth:`ls`, streamed from one query as plain rows (``registry.search.ROW_FIELDS``).

        ``brief``: without NAME and limit, digest, description and file_count are None (what a table shows).
        """
        from adapterhub.registry import search

        if name is None:
            return search.listing(self.index, None, limit, brief=brief)
        rows = search.listing(self.index, check_name(name), limit)
        first = next(rows, None)
        if first is None:
            raise NotFoundError(f"unknown name {name!r}")
        return itertools.chain((first,), rows)

    def ls_table(self) -> list[Sequence[Any]]:
        """Every version as the columns of ``ls --all``'s table (``registry.search.listing_table``)."""
        from adapterhub.registry import search

        return search.listing_table(self.index)

    def search_rows(self, text: str | None = None, *, derived_from: str | Ref | None = None, **filters: Any) -> Iterator[tuple[Any, ...]]:
        """As :meth:`search`, streamed as plain rows (``registry.search.ROW_FIELDS``)."""
        from adapterhub.registry import search

        digest = self.resolve(derived_from).digest if derived_from is not None else None
        return search.search_rows(self.index, text, derived_from=digest, **filters)

    def search(self, text: str | None = None, *, derived_from: str | Ref | None = None, **filters: Any) -> list[VersionInfo]:
        """Versions matching ``text`` and filters; ``derived_from`` takes a ref
        and keeps its descendants (merged, quantized, ...) at any depth."""
        digest = self.resolve(derived_from).digest if derived_from is not None else None
        return self.index.search(text, derived_from=digest, **filters)

    def show(self, ref: str | Ref) -> ShowInfo:
        info = self.resolve(ref)
        lineage = [
            {"parent": e["digest"], "parent_refs": self.index.refs_of(e["digest"]), **{k: e[k] for k in ("relation", "recipe", "created_at")}}
            for e in self.index.parents(info.digest)
        ]
        sigs = [r.to_dict() for r in signatures.rows(self.index, info.digest, newest_first=False)]
        others = [r for r in self.index.refs_of(info.digest) if r != f"{info.name}:{info.version}"]
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

    # -- deleting and checking ---------------------------------------------------

    def plan_rm(self, ref: str | Ref, *, all_versions: bool = False) -> RemovePlan:
        return maintenance.plan_rm(self, ref, all_versions=all_versions)

    def execute_rm(self, plan: RemovePlan) -> RemovePlan:
        """Delete index rows first, then blobs nothing refers to any more."""
        return maintenance.execute_rm(self, plan)

    def plan_gc(self, staging_max_age_s: float | None = None) -> RemovePlan:
        """Unreferenced blobs, temp files, and remote downloads untouched for
        ``staging_max_age_s`` (default: a day) that no running pull holds."""
        return maintenance.plan_gc(self, staging_max_age_s)

    def execute_gc(self, plan: RemovePlan) -> RemovePlan:
        return maintenance.execute_gc(self, plan)

    def fsck(self, progress: ProgressFactory | None = None) -> FsckReport:
        """Re-hash every blob and cross-check the index against the store."""
        return maintenance.fsck(self, progress)
