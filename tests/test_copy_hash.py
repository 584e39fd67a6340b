"""Issue 14, push and pull at the hashing floor: the one-pass copy that push and pull use.

``fsutil.copy_durably`` copies in the kernel in steps while the calling thread
hashes what was already written, read back through a mapping, and starts the
disk writing behind the copy. These tests shrink the steps so that a few KiB
cross many of them, and check the digest is of the bytes written, that a
failure on either side ends the other (no hang, nothing kept), and that push
and pull still refuse what does not match.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import secrets
from pathlib import Path

import pytest

from adapterhub import fsutil, platform
from adapterhub.errors import IntegrityError, StorageError
from adapterhub.registry import Registry

from .conftest import fake_lora

kernel_copy = pytest.mark.skipif(not hasattr(os, "copy_file_range"), reason="no copy_file_range here")


@pytest.fixture
def small_steps(monkeypatch):
    """Copy steps and hash windows of 64 KiB (a multiple of the page size), so a small file crosses many."""
    monkeypatch.setattr(fsutil, "COPY_STEP", 64 * 1024)
    monkeypatch.setattr(fsutil, "HASH_WINDOW", 64 * 1024)


def _src(tmp_path: Path, n: int) -> tuple[Path, bytes]:
    data = secrets.token_bytes(n)
    p = tmp_path / "src.bin"
    p.write_bytes(data)
    return p, data


@kernel_copy
@pytest.mark.parametrize("n", [0, 1, 4096, 64 * 1024, 64 * 1024 + 1, 5 * 64 * 1024 - 7])
def test_copy_durably_hashes_what_it_wrote(tmp_path, small_steps, n):
    src, data = _src(tmp_path, n)
    out = tmp_path / "out.bin"
    assert fsutil.copy_durably(src, out) == hashlib.sha256(data).hexdigest()
    assert out.read_bytes() == data
    assert oct(out.stat().st_mode & 0o777) == "0o600"


@kernel_copy
def test_the_hash_is_read_back_from_the_copy_not_the_source(tmp_path, small_steps, monkeypatch):
    """A kernel that wrote other bytes than it read is caught: the digest is of the destination."""
    src, data = _src(tmp_path, 3 * 64 * 1024)
    real = os.copy_file_range

    def flipping(fd_in, fd_out, count, offset_src=None, offset_dst=None):
        n = real(fd_in, fd_out, count)
        pos = os.lseek(fd_out, 0, os.SEEK_CUR)
        os.pwrite(fd_out, b"\x00", pos - 1)  # the last byte of each step, changed on the way
        return n

    monkeypatch.setattr(os, "copy_file_range", flipping)
    out = tmp_path / "out.bin"
    digest = fsutil.copy_durably(src, out)
    assert digest == hashlib.sha256(out.read_bytes()).hexdigest() != hashlib.sha256(data).hexdigest()
    # and write_atomic, which pull uses with the blob's digest, refuses it and keeps nothing
    with pytest.raises(IntegrityError):
        fsutil.write_atomic(tmp_path / "final.bin", src, expected_sha256=hashlib.sha256(data).hexdigest())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "src.bin"]


@kernel_copy
def test_a_failing_copy_step_ends_the_hash_and_raises(tmp_path, small_steps, monkeypatch):
    src, _ = _src(tmp_path, 6 * 64 * 1024)
    real, calls = os.copy_file_range, []

    def full_disk(fd_in, fd_out, count, offset_src=None, offset_dst=None):
        calls.append(count)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd_in, fd_out, count)

    monkeypatch.setattr(os, "copy_file_range", full_disk)
    with pytest.raises(StorageError, match="no space left"):
        fsutil.write_atomic(tmp_path / "final.bin", src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.bin"]


@kernel_copy
def test_a_failing_hash_stops_the_copy_and_raises(tmp_path, small_steps, monkeypatch):
    src, _ = _src(tmp_path, 8 * 64 * 1024)

    def no_mapping(*a, **kw):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(mmap, "mmap", no_mapping)
    with pytest.raises(StorageError):
        fsutil.write_atomic(tmp_path / "final.bin", src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.bin"]


@kernel_copy
def test_a_source_that_shrinks_mid_copy_is_refused(tmp_path, small_steps, monkeypatch):
    src, _ = _src(tmp_path, 4 * 64 * 1024)
    real, calls = os.copy_file_range, []

    def shrinking(fd_in, fd_out, count, offset_src=None, offset_dst=None):
        calls.append(count)
        if len(calls) == 2:
            os.truncate(src, 64 * 1024 + 10)
        return real(fd_in, fd_out, count)

    monkeypatch.setattr(os, "copy_file_range", shrinking)
    with pytest.raises(IntegrityError, match="changed while it was being copied"):
        fsutil.write_atomic(tmp_path / "final.bin", src)
    assert not (tmp_path / "final.bin").exists()


def test_write_only_destinations_hash_the_source(tmp_path, small_steps):
    """``copy_and_hash`` into a descriptor it cannot read keeps the old way: the source, hashed beside the copy."""
    src, data = _src(tmp_path, 3 * 64 * 1024 + 5)
    fd = os.open(tmp_path / "out.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        assert fsutil.copy_and_hash(src, fd, fsync=True) == hashlib.sha256(data).hexdigest()
    finally:
        os.close(fd)
    assert (tmp_path / "out.bin").read_bytes() == data


def test_progress_counts_every_byte_once(tmp_path, small_steps):
    src, data = _src(tmp_path, 5 * 64 * 1024 + 3)
    seen: list[int] = []
    fsutil.copy_durably(src, tmp_path / "out.bin", seen.append)
    assert sum(seen) == len(data)


def test_start_writeback_is_a_hint_that_may_be_missing(tmp_path, monkeypatch):
    p = tmp_path / "f"
    p.write_bytes(b"x" * 10000)
    fd = os.open(p, os.O_RDWR)
    try:
        if platform.is_linux():
            assert platform.start_writeback(fd, 0, 10000) is True
        monkeypatch.setattr(platform, "_sync_file_range", None)
        monkeypatch.setattr(platform, "is_linux", lambda: False)
        assert platform.start_writeback(fd, 0, 10000) is False
    finally:
        os.close(fd)


def test_push_and_pull_without_writeback_hints_give_the_same_bytes(tmp_path, home, monkeypatch):
    monkeypatch.setattr(platform, "_sync_file_range", False)
    src = fake_lora(tmp_path / "a")
    reg = Registry()
    reg.push(src, "qa")
    reg.pull("qa", tmp_path / "out")
    for f in src.iterdir():
        assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes()


def test_stream_workers_puts_two_files_per_core_in_flight(monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_IO_THREADS", "2")
    assert [fsutil.stream_workers(n) for n in (1, 2, 3, 4, 9)] == [1, 2, 3, 4, 4]
    monkeypatch.setenv("ADAPTERHUB_IO_THREADS", "6")
    assert fsutil.stream_workers(100) == 8


def test_parallel_map_takes_a_worker_count_and_keeps_order():
    import threading

    seen: set[int] = set()

    def work(x: int) -> int:
        seen.add(threading.get_ident())
        return x * x

    assert fsutil.parallel_map(work, list(range(20)), weight=lambda x: x, workers=3) == [x * x for x in range(20)]
    assert fsutil.parallel_map(work, [1, 2], workers=1) == [1, 4]


@kernel_copy
def test_push_of_many_windows_round_trips_and_pull_refuses_a_damaged_blob(tmp_path, home, small_steps):
    src = tmp_path / "ckpt"
    src.mkdir()
    for i, n in enumerate((9 * 64 * 1024 + 1, 5 * 64 * 1024, 3 * 64 * 1024 + 17, 12)):
        (src / f"part{i}.bin").write_bytes(secrets.token_bytes(n))
    (src / "adapter_config.json").write_bytes(b"{}")
    reg = Registry()
    pushed = reg.push(src, "big", inspection=_any_inspection())
    assert pushed.bytes_written == sum(p.stat().st_size for p in src.iterdir())
    reg.pull("big", tmp_path / "out")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == {p.name: p.read_bytes() for p in src.iterdir()}
    # A blob changed in its last window (same size): the copy pull refuses it and leaves nothing.
    entry = next(f for f in reg.index.files(pushed.digest) if f.path == "part0.bin")
    blob = reg.blobs.path(entry.sha256)
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as fh:
        fh.seek(entry.size - 1)
        last = fh.read(1)
        fh.seek(entry.size - 1)
        fh.write(bytes([last[0] ^ 1]))
    with pytest.raises(IntegrityError, match="part0.bin"):
        reg.pull("big", tmp_path / "again")
    assert not (tmp_path / "again").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".again")]


def _any_inspection():
    from adapterhub.artifact import Inspection

    return Inspection(kind="checkpoint", format="safetensors")
