"""GGUF files hashed as they are written, and pushed without being read again.

``GGUFFile(..., digest=True)`` hashes the header it reads back and every
staging buffer as the I/O thread writes it; the digest must be the sha256 of
the finished file, whatever the buffer size, the encoder (C kernel or torch),
the header's length, or the way the file is written (O_DIRECT, refused by the
filesystem, or absent from the platform). ``convert --to gguf --push`` hands
that digest to the registry, which adopts the file by hard link, unread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as T  # noqa: E402

from adapterhub.converters.formats import gguf_arch as ga  # noqa: E402
from tests.test_gguf_quant import path  # noqa: E402,F401 - the kernel/torch fixture


def _tensors(qtype: T) -> list[tuple[str, np.ndarray, T, int | None]]:
    """Name, float32 values, GGML type, q/k heads: row counts that leave partial blocks and padding."""
    rng = np.random.default_rng(1)
    return [
        ("a", (rng.standard_normal((96, 256)) * 3).astype(np.float32), qtype, None),
        ("b", rng.standard_normal(5).astype(np.float32), T.F32, None),  # written whole, unaligned length
        ("c", rng.standard_normal((64, 96)).astype(np.float32), T.F16, 4),
        ("d", rng.standard_normal((128, 64)).astype(np.float32), qtype, 2),
        ("e", rng.standard_normal((33, 64)).astype(np.float32), qtype, None),
    ]


def _write(out: Path, qtype: T, digest: bool, note: int) -> str | None:
    from adapterhub.converters.formats.gguf_write import GGUFFile, OutTensor

    tensors = _tensors(qtype)
    with GGUFFile(out, "llama", digest=digest) as f:
        f.writer.add_block_count(2)
        if note:
            f.writer.add_string("general.note", "x" * note)  # the header ends inside a later block
        f.plan([OutTensor(n, x.shape, q) for n, x, q, _ in tensors])
        for n, x, _, heads in tensors:
            if n == "b":
                f.write(n, x)
            else:
                f.encode_rows(n, ga.permuted_view(torch.from_numpy(x), heads) if heads else torch.from_numpy(x))
    return f.sha256


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("qtype", [T.F16, T.Q8_0])
@pytest.mark.parametrize("stage", ["straddled", "one buffer"])
@pytest.mark.parametrize("note", [0, 5000])
def test_digest_is_the_sha256_of_the_file_written(tmp_path, monkeypatch, path, qtype, stage, note):
    """The digest against hashlib over the finished file; the bytes are those of an unhashed write."""
    from adapterhub.converters.formats import gguf_write

    if stage == "straddled":  # buffers of one block: every tensor crosses several, slabs of 100 values
        monkeypatch.setattr(gguf_write, "STAGE_BYTES", 4096)
        monkeypatch.setattr(gguf_write, "SLAB_ELEMENTS", 100)
    hashed, plain = tmp_path / "hashed.gguf", tmp_path / "plain.gguf"
    digest = _write(hashed, qtype, True, note)
    assert _write(plain, qtype, False, note) is None
    data = hashed.read_bytes()
    assert digest == hashlib.sha256(data).hexdigest()
    assert data == plain.read_bytes()
    if stage == "straddled":
        assert len(data) > 8 * gguf_write.STAGE_BYTES
    else:
        assert len(data) < gguf_write.STAGE_BYTES
    if note:  # the header ends after the first block: part of it is read back and hashed, part rewritten
        assert gguf.GGUFReader(hashed).data_offset > 4096


@contextlib.contextmanager
def _ramfs(at: Path) -> Iterator[Path]:
    """A ramfs at ``at`` (it refuses O_DIRECT with EINVAL); skips where mounting is not allowed."""
    at.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command")
    r = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(at)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"needs root to mount a ramfs: {r.stderr.strip() or r.returncode}")
    try:
        yield at
    finally:
        if subprocess.run(["umount", str(at)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(at)], capture_output=True)


@pytest.mark.parametrize("how", ["refused by the filesystem", "absent from the platform"])
@pytest.mark.parametrize("qtype", [T.F16, T.Q8_0])
def test_digest_when_written_through_the_page_cache(tmp_path, monkeypatch, path, how, qtype):
    """Where O_DIRECT is refused (ramfs: EINVAL) or absent (macOS), the buffers go through the page
    cache; the digest is still the file's, and the file and digest are those of an O_DIRECT write."""
    from adapterhub.converters.formats import gguf_write
    from adapterhub.platform import open_direct

    monkeypatch.setattr(gguf_write, "STAGE_BYTES", 8192)
    ref = tmp_path / "ref.gguf"  # written with O_DIRECT where this disk allows it
    ref_digest = _write(ref, qtype, True, 5000)
    with contextlib.ExitStack() as stack:
        if how == "absent from the platform":
            monkeypatch.delattr(os, "O_DIRECT", raising=False)
            d = tmp_path
        else:
            d = stack.enter_context(_ramfs(tmp_path / "ram"))
        fd, direct = open_direct(d / "probe", os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        assert direct is False  # so the writer cannot use O_DIRECT here either
        out = d / "m.gguf"
        digest = _write(out, qtype, True, 5000)
        assert digest == _sha256(out) == ref_digest
        assert out.read_bytes() == ref.read_bytes()


def _rchar() -> int:
    """Bytes this process has read by read(2) and its kind, from the page cache or not (mmap faults are not counted)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def _pushed_gguf(reg, ref: str) -> tuple[str, str, Path]:
    (entry, blob), = [(f, p) for f, p in reg.files(ref) if f.path.endswith(".gguf")]
    return entry.path, entry.sha256, blob


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_convert_push_stores_the_digest_computed_while_writing(cli, trained_llama, path, outtype):
    """``convert --to gguf --push``: the report carries the digest, the manifest has it, fsck is clean."""
    from adapterhub.convert.gguf import to_gguf
    from adapterhub.registry import Registry

    res = to_gguf(trained_llama, outtype=outtype, push=f"team/h-{outtype}:1")
    (name, digest), = res.report.file_sha256.items()
    reg = Registry()
    assert _pushed_gguf(reg, f"team/h-{outtype}:1")[:2] == (name, digest) == (f"h-{outtype}.{outtype}.gguf", digest)
    assert _sha256(_pushed_gguf(reg, f"team/h-{outtype}:1")[2]) == digest
    fsck = json.loads(cli("fsck", "--json").stdout)
    assert fsck["ok"] is True and fsck["problems"] == [] and fsck["staging"] == [], fsck


def test_lora_and_merge_pushes_carry_the_digest(trained_llama, tmp_path):
    from adapterhub.convert.gguf import merge_to_gguf, to_gguf
    from adapterhub.registry import Registry
    from tests.test_gguf_lora import make_adapter

    adapter = make_adapter(tmp_path / "lora", trained_llama, target_modules=["q_proj", "v_proj"])
    reg = Registry()
    for ref, res in [
        ("team/lora-gguf:1", to_gguf(adapter, base=trained_llama, push="team/lora-gguf:1")),
        ("team/merged-gguf:1", merge_to_gguf(
            adapter, trained_llama, outtype="q8_0", push="team/merged-gguf:1", modelfile=True,  # the Modelfile is hashed by the push
        )),
    ]:
        name, digest, blob = _pushed_gguf(reg, ref)
        assert res.report.file_sha256 == {name: digest} and _sha256(blob) == digest
    # -o OUT without --push: nothing is hashed; with --push too, OUT is a copy of the hashed file
    res = to_gguf(adapter, base=trained_llama, out=tmp_path / "l.gguf")
    assert res.report.file_sha256 == {}
    # (f16: other bytes than the f32 pushed above; the same bytes would be the same artifact, under its first names)
    res = to_gguf(adapter, base=trained_llama, outtype="f16", out=tmp_path / "both.gguf", push="team/both:1")
    name, digest, _ = _pushed_gguf(reg, "team/both:1")
    assert res.report.file_sha256 == {name: digest} and _sha256(tmp_path / "both.gguf") == digest


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts reads through /proc/self/io (Linux)")
def test_push_adopts_the_gguf_by_hard_link_without_reading_it(trained_llama):
    """The push as ``convert --push`` makes it: the GGUF written into the registry's staging
    directory with its digest becomes the blob itself (the same inode: no copy), and the push
    reads a small part of it (its header, for the inspection). The control: a push of another
    GGUF without its digest reads the whole file to hash it."""
    from adapterhub.converters.formats.safetensors_io import file_map
    from adapterhub.converters.gguf import model_to_gguf
    from adapterhub.registry import Registry

    reg = Registry()
    dirs = {}
    for outtype in ("q8_0", "f16", "f32"):
        d = dirs[outtype] = reg.staging_dir("convert") / "out"
        d.mkdir(parents=True)
        rep = model_to_gguf(file_map(trained_llama), d / f"m.{outtype}.gguf", outtype=outtype, hash_outputs=True)
        assert rep.file_sha256 == {f"m.{outtype}.gguf": _sha256(d / f"m.{outtype}.gguf")}
        dirs[outtype] = (d, rep.file_sha256)
    d, digests = dirs["q8_0"]
    reg.push(d, "team/warm:1", verified=digests)  # imports and opens the index; not counted below
    d, digests = dirs["f16"]
    out = d / "m.f16.gguf"
    before = _rchar()
    reg.push(d, "team/m:1", verified=digests)
    read = _rchar() - before
    assert read < out.stat().st_size // 4, (read, out.stat().st_size)
    blob = reg.blobs.path(digests["m.f16.gguf"])
    assert blob.stat().st_ino == out.stat().st_ino and blob.stat().st_nlink == 2  # adopted: a hard link
    assert _pushed_gguf(reg, "team/m:1")[1] == digests["m.f16.gguf"]
    d, _ = dirs["f32"]
    before = _rchar()
    reg.push(d, "team/control:1")
    assert _rchar() - before >= (d / "m.f32.gguf").stat().st_size


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts reads through /proc/self/io (Linux)")
def test_convert_push_does_not_read_its_output_back(cli, trained_llama):
    """End to end, in this process: ``convert --to gguf --push`` of a registry input reads less than
    half the GGUF it stores (a re-hash or a copy would read all of it). The input is pushed first, so
    its lineage digest is the registry's; a first conversion warms imports and the index."""
    from adapterhub.registry import Registry

    assert cli("push", trained_llama, "team/base:1").exit_code == 0
    assert cli("convert", "team/base:1", "--to", "gguf", "--outtype", "q8_0", "--push", "team/warm:1").exit_code == 0
    before = _rchar()
    r = cli("convert", "team/base:1", "--to", "gguf", "--outtype", "f32", "--push", "team/g:1")
    read = _rchar() - before
    assert r.exit_code == 0, r.output
    _, digest, blob = _pushed_gguf(Registry(), "team/g:1")
    assert _sha256(blob) == digest
    assert read < blob.stat().st_size // 2, (read, blob.stat().st_size)
    assert json.loads(cli("fsck", "--json").stdout)["ok"] is True
