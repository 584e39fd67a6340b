"""fsck reports exactly what it checked and exactly what is wrong.

Written against the mutants of ``registry.maintenance.fsck`` that survived
mutation testing (docs/reliability.md, "Mutation testing"): signature blobs
are checked like any other, the progress bar and the counts cover every
re-hashed byte and nothing else, one damaged blob does not hide the next, and
each problem names the blob and who uses it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from adapterhub.registry import Registry, records, signatures

from .conftest import fake_lora, make_files


class Bars:
    """A progress factory that remembers what fsck told it."""

    def __init__(self) -> None:
        self.opened: list[tuple[str, int]] = []
        self.done = 0

    def __call__(self, desc: str, total: int):
        self.opened.append((desc, total))
        outer = self

        class Bar:
            def update(self, n: int) -> None:
                outer.done += n

            def close(self) -> None:
                pass

        return Bar()


def _put_orphan(store_path: Path, data: bytes) -> None:
    p = store_path
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def _tamper(p: Path) -> None:
    """Same size, other bytes (the store's files are read-only)."""
    os.chmod(p, 0o644)
    data = bytearray(p.read_bytes())
    data[0] ^= 0xFF
    p.write_bytes(bytes(data))


def _record_blobs(reg: Registry) -> dict[str, int]:
    used = records.referenced(reg.index)
    return {b.sha256: b.size for b in reg.records if b.sha256 in used}


def test_fsck_counts_and_shows_every_byte_it_rehashes_and_no_other(tmp_path):
    reg = Registry()
    a = reg.push(fake_lora(tmp_path / "a"), "qa")
    b = reg.push(fake_lora(tmp_path / "b", seed=2), "team/qb")
    blobs = {f.sha256: f.size for d in (a.digest, b.digest) for f in reg.index.files(d)}
    recs = _record_blobs(reg)
    assert len(recs) >= 2
    orphan = b"not used by anything"  # neither counted nor shown: gc's business
    _put_orphan(reg.blobs.path(hashlib.sha256(orphan).hexdigest()), orphan)
    _put_orphan(reg.records.path(hashlib.sha256(orphan + b"!").hexdigest()), orphan + b"!")
    bars = Bars()
    rep = reg.fsck(progress=bars)
    assert rep.problems == () and rep.ok
    assert (rep.blobs_checked, rep.bytes_checked) == (len(blobs), sum(blobs.values()))
    assert rep.records_checked == len(recs)
    total = sum(blobs.values()) + sum(recs.values())
    assert bars.opened == [("checking blobs", total)] and bars.done == total
    assert rep.unreferenced == (hashlib.sha256(orphan).hexdigest(),)
    assert rep.staging == () and rep.unrecorded == 0
    reg.index.conn.execute("delete from records where kind = 'version'")  # as if pushed before records existed
    assert reg.fsck().unrecorded == 2


def test_signature_blobs_are_checked_and_named(tmp_path):
    pytest.importorskip("model_signing")
    from adapterhub.trust import keys, signing

    reg = Registry()
    res = reg.push(fake_lora(tmp_path / "a"), "qa")
    keys.generate()
    signing.sign_ref(reg, "qa", keys.get("default"))
    (sig,) = signatures.blobs(reg.index)
    files = reg.index.files(res.digest)
    rep = reg.fsck()
    assert rep.ok and sig not in rep.unreferenced
    assert rep.blobs_checked == len(files) + 1
    assert rep.bytes_checked == sum(f.size for f in files) + reg.blobs.path(sig).stat().st_size
    _tamper(reg.blobs.path(sig))
    (problem,) = reg.fsck().problems
    assert problem.startswith(f"blob {sig} is corrupt: its content hashes to ") and problem.endswith(" (used by (signature))")
    os.unlink(reg.blobs.path(sig))
    assert reg.fsck().problems == (f"blob {sig} is missing (used by (signature))",)


def test_every_damaged_blob_is_reported_with_its_users(tmp_path):
    reg = Registry()
    shared = b"the same bytes in four files"
    src = make_files(fake_lora(tmp_path / "a"), {f"w{i}.bin": shared for i in range(4)})
    res = reg.push(src, "qa")
    sha = hashlib.sha256(shared).hexdigest()
    blob = reg.blobs.path(sha)
    os.unlink(blob)
    assert reg.fsck().problems == (f"blob {sha} is missing (used by w0.bin, w1.bin, w2.bin)",)  # three users shown
    _put_orphan(blob, shared)
    # The first blob (in the order fsck checks) missing and the last one corrupt: both are reported.
    by_sha = sorted(reg.index.files(res.digest), key=lambda f: f.sha256)
    first, last = by_sha[0], by_sha[-1]
    kept = reg.blobs.path(first.sha256).read_bytes()
    os.unlink(reg.blobs.path(first.sha256))
    _tamper(reg.blobs.path(last.sha256))
    got = hashlib.sha256(reg.blobs.path(last.sha256).read_bytes()).hexdigest()
    users = ", ".join(sorted(f.path for f in by_sha if f.sha256 == first.sha256)[:3])
    last_users = ", ".join(sorted(f.path for f in by_sha if f.sha256 == last.sha256)[:3])
    assert reg.fsck().problems == (
        f"blob {first.sha256} is missing (used by {users})",
        f"blob {last.sha256} is corrupt: its content hashes to {got} (used by {last_users})",
    )
    _put_orphan(reg.blobs.path(first.sha256), kept)


def test_a_size_mismatch_names_the_file_and_the_artifact(tmp_path):
    reg = Registry()
    res = reg.push(fake_lora(tmp_path / "a"), "qa")
    f = reg.index.files(res.digest)[0]
    reg.index.conn.execute("update files set size = size + 7 where digest = ? and path = ?", (res.digest, f.path))
    reg.index.conn.execute("update artifacts set size = size + 7 where digest = ?", (res.digest,))
    assert reg.fsck().problems == (
        f"blob {f.sha256} is {f.size} bytes, but {f.path} in {res.digest[:19]}… is recorded as {f.size + 7} bytes",
    )


def test_every_damaged_record_blob_is_reported(tmp_path):
    reg = Registry()
    reg.push(fake_lora(tmp_path / "a"), "qa")
    recs = sorted(_record_blobs(reg))
    first, last = recs[0], recs[-1]
    os.unlink(reg.records.path(first))
    _tamper(reg.records.path(last))
    got = hashlib.sha256(reg.records.path(last).read_bytes()).hexdigest()
    rep = reg.fsck()
    assert rep.problems == (
        f"record blob {first} is missing (an index rebuild would lose what it records)",
        f"blob {last} is corrupt: its content hashes to {got} (a record blob)",
    )
    assert rep.records_checked == len(recs) - 1


def test_a_killed_remote_pull_s_work_dir_is_listed_by_path(tmp_path):
    reg = Registry()
    reg.push(fake_lora(tmp_path / "a"), "qa")
    work = reg.home / "remote-staging" / "pull-0123456789ab.incomplete"
    (work / "qa").mkdir(parents=True)
    (work / "qa" / "adapter_model.safetensors").write_bytes(b"half")
    rep = reg.fsck()
    assert rep.ok and rep.staging == (str(work),)
