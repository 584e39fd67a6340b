"""Issue 15, other platforms: every Linux-only call has a fallback that gives the same bytes.

macOS has no ``copy_file_range``, ``O_DIRECT``, ``preadv`` (before 11),
``fdatasync``, ``sched_getaffinity``, FICLONE or ``/proc``; some Linux
filesystems refuse the first three too. Each test takes one of them away
(the attribute deleted, or the call failing as a kernel says it cannot) and
compares the result with what Linux's fast path writes. The last test takes
them all away at once and runs push, pull and merge.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import secrets
import sys
from pathlib import Path

import pytest

from adapterhub import fsutil, platform

LINUX_ONLY = ("copy_file_range", "O_DIRECT", "preadv", "pwritev", "fdatasync", "sched_getaffinity", "posix_fadvise")


def _refusing(err: int):
    def call(*a, **kw):
        raise OSError(err, os.strerror(err))

    return call


@pytest.fixture(params=["absent", "ENOSYS", "EXDEV", "EINVAL", "EOPNOTSUPP"])
def no_copy_file_range(request, monkeypatch):
    """``os.copy_file_range`` missing (macOS) or refused the ways a Linux kernel refuses it."""
    if request.param == "absent":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    else:
        monkeypatch.setattr(os, "copy_file_range", _refusing(getattr(errno, request.param)), raising=False)
    return request.param


def _data(n: int = 3 * 1024 * 1024 + 17) -> bytes:
    return secrets.token_bytes(n)


# -- copy_file_range ----------------------------------------------------------------------


def _copy_and_hash(src: Path, dst: Path) -> str:
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        return fsutil.copy_and_hash(src, fd, fsync=True)
    finally:
        os.close(fd)


def test_push_copy_without_copy_file_range_gives_the_same_bytes(tmp_path, no_copy_file_range, monkeypatch):
    data = _data()
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    digest = _copy_and_hash(src, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == data
    assert digest == hashlib.sha256(data).hexdigest()
    # and write_atomic, which push and pull use, from a file
    assert fsutil.write_atomic(tmp_path / "atomic.bin", src) == digest
    assert (tmp_path / "atomic.bin").read_bytes() == data


def test_push_copy_with_copy_file_range_matches_the_fallback(tmp_path):
    if not hasattr(os, "copy_file_range"):
        pytest.skip("no copy_file_range on this platform: the fallback is the only path")
    data = _data()
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    assert _copy_and_hash(src, tmp_path / "out.bin") == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "out.bin").read_bytes() == data


def test_kernel_copy_reports_real_failures(tmp_path, monkeypatch):
    """A full disk is not "the kernel cannot copy": it must not turn into a silent fallback."""
    monkeypatch.setattr(os, "copy_file_range", _refusing(errno.ENOSPC), raising=False)
    with pytest.raises(OSError) as e:
        platform.kernel_copy(0, 1, 10)
    assert e.value.errno == errno.ENOSPC


def _copy_range(src: Path, dst: Path, offset: int, nbytes: int, sha=None) -> None:
    from adapterhub.converters.formats import shards

    s = os.open(src, os.O_RDONLY)
    d = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(d, b"head")
        shards._copy_range(s, d, offset, nbytes, "src.bin", "t", sha)
    finally:
        os.close(s)
        os.close(d)


def test_shard_span_copy_without_copy_file_range_gives_the_same_bytes(tmp_path, no_copy_file_range, monkeypatch):
    from adapterhub.converters.formats import shards

    monkeypatch.setattr(shards, "COPY_CHUNK", 64 * 1024)  # many chunks
    data = _data()
    (tmp_path / "src.bin").write_bytes(data)
    _copy_range(tmp_path / "src.bin", tmp_path / "out.bin", 1001, len(data) - 2000)
    assert (tmp_path / "out.bin").read_bytes() == b"head" + data[1001 : len(data) - 999]


def test_shard_span_copy_survives_a_kernel_that_stops_copying_midway(tmp_path, monkeypatch):
    """The first chunks copied in the kernel, the rest refused (EXDEV): the bytes still line up."""
    from adapterhub.converters.formats import shards

    if not hasattr(os, "copy_file_range"):
        pytest.skip("no copy_file_range on this platform")
    monkeypatch.setattr(shards, "COPY_CHUNK", 64 * 1024)
    real, calls = os.copy_file_range, []

    def flaky(*a):
        calls.append(a)
        if len(calls) > 3:
            raise OSError(errno.EXDEV, "cross-device")
        return real(*a)

    monkeypatch.setattr(os, "copy_file_range", flaky)
    data = _data()
    (tmp_path / "src.bin").write_bytes(data)
    _copy_range(tmp_path / "src.bin", tmp_path / "out.bin", 5, len(data) - 5)
    assert len(calls) == 4  # three copied by the kernel, then the fallback took over for good
    assert (tmp_path / "out.bin").read_bytes() == b"head" + data[5:]


# -- preadv ---------------------------------------------------------------------------------


@pytest.fixture(params=["absent", "ENOSYS"])
def no_preadv(request, monkeypatch):
    if request.param == "absent":
        monkeypatch.delattr(os, "preadv", raising=False)
    else:
        monkeypatch.setattr(os, "preadv", _refusing(errno.ENOSYS), raising=False)
    return request.param


def test_pread_into_without_preadv_reads_the_same_bytes(tmp_path, no_preadv):
    data = _data(100_000)
    (tmp_path / "f").write_bytes(data)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        buf = bytearray(40_000)
        assert platform.pread_into(fd, memoryview(buf), 123) == 40_000
        assert bytes(buf) == data[123:40_123]
        tail = bytearray(10)
        assert platform.pread_into(fd, memoryview(tail), len(data) - 4) == 4  # short at the end
        assert bytes(tail[:4]) == data[-4:]
        assert platform.pread_into(fd, memoryview(tail), len(data)) == 0
    finally:
        os.close(fd)


def test_safetensors_reader_without_preadv(tmp_path, no_preadv):
    from adapterhub.converters.formats.safetensors_io import _pread_exact

    data = _data(50_000)
    (tmp_path / "f").write_bytes(data)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        buf = bytearray(30_000)
        _pread_exact(fd, memoryview(buf), 777)
        assert bytes(buf) == data[777:30_777]
        with pytest.raises(EOFError):
            _pread_exact(fd, memoryview(bytearray(10)), len(data) - 5)
    finally:
        os.close(fd)


# -- O_DIRECT -------------------------------------------------------------------------------


def test_open_direct_without_O_DIRECT_writes_through_the_page_cache(tmp_path, monkeypatch):
    import fcntl

    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    fd, direct = platform.open_direct(tmp_path / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        assert direct is False
        monkeypatch.setattr(fcntl, "fcntl", _refusing(errno.EBADF))  # clear_direct must not touch the flags
        platform.clear_direct(fd)
        data = _data(10_001)  # unaligned: fine without O_DIRECT
        assert os.write(fd, data) == len(data)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == data


def _blob_writer_bytes(tmp_path: Path, name: str, data: bytes) -> tuple[bytes, bool]:
    pytest.importorskip("requests")
    from adapterhub.registry.remotes.oci.transfer import BlobWriter

    align = platform.DIRECT_ALIGN
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    view = memoryview(buf)
    w = BlobWriter(tmp_path / name, False, 0, True)
    started_direct = w.direct
    try:
        w.write(view[: 2 * align])
        w.write(view[2 * align :])
    finally:
        os.close(w.fd)
        view.release()
    return (tmp_path / name).read_bytes(), started_direct


def test_download_writer_without_O_DIRECT_gives_the_same_bytes(tmp_path, monkeypatch):
    data = _data(3 * platform.DIRECT_ALIGN + 99)
    with_direct, _ = _blob_writer_bytes(tmp_path, "a", data)
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    without, started_direct = _blob_writer_bytes(tmp_path, "b", data)
    assert started_direct is False
    assert without == with_direct == data


def _shard_file_bytes(path: Path, src: Path, own: bytes) -> tuple[bytes, bool]:
    from adapterhub.converters.formats import shards

    f = shards._ShardFile(path, digest=True)
    direct = f.direct
    s = os.open(src, os.O_RDONLY)
    try:
        f.write(own)
        f.copy_from(s, 3, os.path.getsize(src) - 3, "src", "t")
        f.write(own[:7])
    finally:
        os.close(s)
        f.close(sync=True)
    data = path.read_bytes()
    assert f.sha256.hexdigest() == hashlib.sha256(data).hexdigest()
    return data, direct


@pytest.mark.parametrize("gone", [("O_DIRECT",), ("preadv",), ("O_DIRECT", "preadv", "copy_file_range")])
def test_shard_writer_without_linux_calls_gives_the_same_bytes(tmp_path, monkeypatch, gone):
    """The merge's shard writer: staged O_DIRECT writes read spans with preadv; buffered ones copy them."""
    pytest.importorskip("torch")
    from adapterhub.converters.formats import shards

    monkeypatch.setattr(shards, "STAGE_BYTES", 2 * platform.DIRECT_ALIGN)  # copies cross stage boundaries
    own, src = _data(5000), tmp_path / "src"
    src.write_bytes(_data(7 * platform.DIRECT_ALIGN + 321))
    want, _ = _shard_file_bytes(tmp_path / "fast", src, own)
    for name in gone:
        monkeypatch.delattr(os, name, raising=False)
    got, direct = _shard_file_bytes(tmp_path / "slow", src, own)
    assert got == want
    if "O_DIRECT" in gone:
        assert direct is False


# -- FICLONE --------------------------------------------------------------------------------


def test_reflink_is_never_tried_off_linux(tmp_path, monkeypatch):
    import fcntl

    (tmp_path / "src").write_bytes(b"abc")
    monkeypatch.setattr(platform, "is_linux", lambda: False)
    monkeypatch.setattr(fcntl, "ioctl", lambda *a: pytest.fail("a Linux ioctl number sent to another kernel"))
    assert fsutil.reflink(tmp_path / "src", tmp_path / "dst") is False
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("err", ["EOPNOTSUPP", "EXDEV", "EINVAL", "ENOTTY", "ENOSYS"])
def test_reflink_refused_by_the_filesystem_leaves_no_file(tmp_path, monkeypatch, err):
    import fcntl

    (tmp_path / "src").write_bytes(b"abc")
    monkeypatch.setattr(fcntl, "ioctl", _refusing(getattr(errno, err)))
    assert fsutil.reflink(tmp_path / "src", tmp_path / "dst") is False
    assert not (tmp_path / "dst").exists()


def test_pull_link_without_reflink_uses_hard_links_with_the_same_bytes(tmp_path, monkeypatch):
    from adapterhub.registry import Registry
    from tests.factories import fake_lora

    src = fake_lora(tmp_path / "a")
    Registry().push(src, "qa")
    monkeypatch.setattr(platform, "is_linux", lambda: False)
    res = Registry().pull("qa", tmp_path / "linked", link=True)
    assert res.materialized == "hardlink"
    for p in src.rglob("*"):
        if p.is_file():
            assert (tmp_path / "linked" / p.relative_to(src)).read_bytes() == p.read_bytes()


# -- fdatasync, sched_getaffinity -----------------------------------------------------------


def test_fdatasync_falls_back_to_fsync(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "fdatasync", raising=False)
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"data")
        platform.fdatasync(fd)
    finally:
        os.close(fd)
    assert synced == [fd]
    assert (tmp_path / "f").read_bytes() == b"data"


def test_cpu_count_without_sched_getaffinity(monkeypatch):
    monkeypatch.delenv("ADAPTERHUB_IO_THREADS", raising=False)
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert platform.cpu_count() == (os.cpu_count() or 1)
    assert fsutil.io_workers(100) == max(1, min(os.cpu_count() or 1, 8))


def test_cpu_count_follows_the_affinity_mask_where_there_is_one(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert platform.cpu_count() == 1
    monkeypatch.delenv("ADAPTERHUB_IO_THREADS", raising=False)
    assert fsutil.io_workers(100) == 1


# -- /proc and resource ---------------------------------------------------------------------


def test_lock_holders_without_proc_is_empty(tmp_path, monkeypatch):
    from adapterhub.registry.locking import lock_holders

    (tmp_path / "registry.lock").write_text("")
    monkeypatch.setattr(platform, "PROC", tmp_path / "no-proc")
    assert platform.read_proc("locks") is None
    assert lock_holders(tmp_path / "registry.lock") == []


def test_lock_holders_read_from_proc_locks(tmp_path, monkeypatch):
    from adapterhub.registry.locking import lock_holders

    lock = tmp_path / "registry.lock"
    lock.write_text("")
    st = os.stat(lock)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "locks").write_text(f"1: FLOCK  ADVISORY  WRITE 4242 {dev} 0 EOF\n2: POSIX ADVISORY WRITE 7 {dev} 0 EOF\n")
    monkeypatch.setattr(platform, "PROC", tmp_path / "proc")
    assert lock_holders(lock) == [4242]


def test_available_memory_without_psutil_or_proc(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil -> ImportError
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "meminfo").write_text("MemTotal: 1000 kB\nMemAvailable:  2048 kB\n")
    monkeypatch.setattr(platform, "PROC", tmp_path / "proc")
    assert platform.available_memory() == 2048 * 1024
    monkeypatch.setattr(platform, "PROC", tmp_path / "no-proc")
    sysconf = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda n: {"SC_AVPHYS_PAGES": 10, "SC_PAGE_SIZE": 4096}[n] if isinstance(n, str) else sysconf(n))
    assert platform.available_memory() == 10 * 4096
    monkeypatch.setattr(os, "sysconf", _refusing(errno.EINVAL))
    assert platform.available_memory() is None


def test_verify_memory_estimate_without_psutil_or_proc(tmp_path, monkeypatch):
    from adapterhub.verify import devices

    monkeypatch.setitem(sys.modules, "psutil", None)
    monkeypatch.setattr(platform, "PROC", tmp_path / "no-proc")
    monkeypatch.setattr(os, "sysconf", _refusing(errno.EINVAL))
    assert devices._free_bytes("cpu") == 8 << 30  # the stated default, not a crash


def test_peak_rss_units(monkeypatch):
    import resource

    raw = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    monkeypatch.setattr(sys, "platform", "darwin")
    assert platform.peak_rss_bytes() >= raw  # bytes as reported
    monkeypatch.setattr(sys, "platform", "linux")
    assert platform.peak_rss_bytes() >= raw * 1024  # KiB as reported


# -- all at once: what a Mac sees -----------------------------------------------------------


def _random_base(path: Path, hidden: int = 32, layers: int = 2, vocab: int = 64) -> Path:
    import json

    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(5)
    path.mkdir(parents=True)
    w = {f"model.layers.{i}.self_attn.{m}.weight": rng.standard_normal((hidden, hidden)).astype(np.float32)
         for i in range(layers) for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
    w["model.embed_tokens.weight"] = rng.standard_normal((vocab, hidden)).astype(np.float32)
    save_file(w, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": 4, "vocab_size": vocab, "torch_dtype": "float32",
    }))
    return path


def _push_pull_merge(tmp_path: Path, home: Path, adapter: Path, base: Path, monkeypatch) -> dict[str, bytes]:
    from adapterhub.converters.formats import shards
    from adapterhub.converters.formats.safetensors_io import file_map
    from adapterhub.converters.merge import merge
    from adapterhub.registry import Registry

    monkeypatch.setenv("ADAPTERHUB_HOME", str(home))
    monkeypatch.setattr(shards, "STAGE_BYTES", 2 * platform.DIRECT_ALIGN)
    reg = Registry()
    pushed = reg.push(adapter, "team/qa")
    out: dict[str, bytes] = {"digest": pushed.digest.encode()}
    for mode, kw in (("copy", {}), ("link", {"link": True})):
        dest = tmp_path / mode
        reg.pull("team/qa", dest, **kw)
        out.update({f"{mode}/{p.relative_to(dest)}": p.read_bytes() for p in sorted(dest.rglob("*")) if p.is_file()})
    merge(file_map(tmp_path / "copy"), file_map(base), tmp_path / "merged", device="cpu")
    out.update({f"merged/{p.name}": p.read_bytes() for p in sorted((tmp_path / "merged").iterdir())})
    assert reg.fsck().ok
    return out


def test_push_pull_merge_without_any_linux_only_call(tmp_path, monkeypatch):
    """push, pull (copy and --link) and merge with every Linux-only call gone give the same bytes."""
    pytest.importorskip("torch")
    from tests.factories import fake_lora

    adapter = fake_lora(tmp_path / "adapter", hidden=32)
    base = _random_base(tmp_path / "base")
    (tmp_path / "linux").mkdir()
    want = _push_pull_merge(tmp_path / "linux", tmp_path / "home-linux", adapter, base, monkeypatch)
    for name in LINUX_ONLY:
        monkeypatch.delattr(os, name, raising=False)
    monkeypatch.setattr(platform, "is_linux", lambda: False)
    monkeypatch.setattr(platform, "PROC", tmp_path / "no-proc")
    (tmp_path / "mac").mkdir()
    got = _push_pull_merge(tmp_path / "mac", tmp_path / "home-mac", adapter, base, monkeypatch)
    assert got.keys() == want.keys()
    assert got == want
    assert any(k.startswith("merged/") and k.endswith(".safetensors") for k in got)
