import hashlib
import json
import os

import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import load_file, save_file  # noqa: E402

from adapterhub.errors import ConflictError, InvalidArtifactError, UnsafePathError  # noqa: E402
from adapterhub.converters.formats.safetensors_io import INDEX_NAME, TensorSource, TensorSpec, file_map  # noqa: E402
from adapterhub.converters.formats.shards import StreamingShardWriter  # noqa: E402
from adapterhub.converters.output import staged_dir  # noqa: E402


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(128, generator=g),
        "c.bias": torch.arange(7, dtype=torch.int64),
        "d.mask": torch.tensor([True, False, True]),
        "e.scalar": torch.tensor(3.5, dtype=torch.float16),
    }


def test_streaming_writer_round_trip_sharded(tmp_path):
    ts = _tensors()
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in ts.items()]
    w = StreamingShardWriter(tmp_path, specs, max_shard_bytes=4096)
    for k, v in ts.items():
        w.write(k, v)
    files = w.close()
    assert len(files) > 2 and files[-1] == INDEX_NAME
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(ts)
    src = TensorSource(file_map(tmp_path))
    for k, v in ts.items():
        assert torch.equal(src.get(k), v)
        loaded = load_file(tmp_path / src.shard_of(k))[k]  # the reference reader agrees
        assert torch.equal(loaded, v)


def test_single_shard_is_model_safetensors(tmp_path):
    ts = _tensors()
    w = StreamingShardWriter(tmp_path, [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in ts.items()])
    for k, v in ts.items():
        w.write(k, v)
    assert w.close() == ["model.safetensors"]
    assert all(torch.equal(load_file(tmp_path / "model.safetensors")[k], v) for k, v in ts.items())


def test_writer_enforces_plan(tmp_path):
    w = StreamingShardWriter(tmp_path, [TensorSpec("x", (2,), torch.float32), TensorSpec("y", (2,), torch.float32)])
    with pytest.raises(ValueError, match="plan order"):
        w.write("y", torch.zeros(2))
    with pytest.raises(ValueError, match="planned"):
        w.write("x", torch.zeros(3))
    w.write("x", torch.zeros(2))
    with pytest.raises(ValueError, match="incomplete"):
        w.close()
    w.abort()


def test_source_rejects_bad_index_and_truncation(tmp_path):
    save_file({"w": torch.zeros(4, 4)}, str(tmp_path / "model-00001-of-00001.safetensors"))
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {"w": "../../x.safetensors"}}))
    with pytest.raises(UnsafePathError):
        TensorSource(file_map(tmp_path))
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}}))
    assert TensorSource(file_map(tmp_path)).spec("w").shape == (4, 4)
    p = tmp_path / "model-00001-of-00001.safetensors"
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(InvalidArtifactError, match="truncated"):
        TensorSource(file_map(tmp_path))


def test_staged_dir(tmp_path):
    out = tmp_path / "out"
    with staged_dir(out) as tmp:
        (tmp / "f").write_text("1")
    assert (out / "f").read_text() == "1"
    with pytest.raises(ConflictError):
        with staged_dir(out):
            pass
    with pytest.raises(KeyboardInterrupt):
        with staged_dir(out, force=True) as tmp:
            (tmp / "g").write_text("2")
            raise KeyboardInterrupt
    assert os.listdir(out) == ["f"]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp dir left behind
    with staged_dir(out, force=True) as tmp:
        (tmp / "g").write_text("2")
    assert os.listdir(out) == ["g"]


# --------------------------------------------------------------------------- O_DIRECT writes


def _write_mixed(out, src_dir, direct):
    """Tensors written from memory and copied from a source file, across staging-buffer boundaries."""
    src = TensorSource(file_map(src_dir))
    g = torch.Generator().manual_seed(1)
    own = {"x.weight": torch.randn(3001, generator=g), "y.weight": torch.randn(5, 7, generator=g).to(torch.float16)}
    specs = [TensorSpec("x.weight", (3001,), torch.float32), src.spec("big"), TensorSpec("y.weight", (5, 7), torch.float16), src.spec("odd")]
    w = StreamingShardWriter(out, specs, direct=direct, digests=True)
    w.write("x.weight", own["x.weight"])
    w.copy_span("big", src.spec("big"), src.span("big"))
    w.write("y.weight", own["y.weight"])
    w.copy_span("odd", src.spec("odd"), src.span("odd"))
    assert w.close() == ["model.safetensors"]
    data = (out / "model.safetensors").read_bytes()
    assert w.sha256 == {"model.safetensors": hashlib.sha256(data).hexdigest()}  # hashed as written
    return data


@pytest.fixture
def mixed_source(tmp_path):
    g = torch.Generator().manual_seed(2)
    d = tmp_path / "src"
    d.mkdir()
    save_file({"big": torch.randn(9000, generator=g), "odd": torch.arange(13, dtype=torch.int8)}, str(d / "model.safetensors"))
    return d


def test_direct_writes_give_the_same_bytes_as_buffered_ones(tmp_path, mixed_source, monkeypatch):
    from adapterhub.converters.formats import shards as sio

    monkeypatch.setattr(sio, "STAGE_BYTES", 2 * sio.DIRECT_ALIGN)  # every tensor crosses a stage boundary
    probe = sio._ShardFile(tmp_path / "probe")
    uses_direct = probe.direct
    probe.close(sync=False)
    if not uses_direct:
        pytest.skip("this filesystem refuses O_DIRECT")
    (tmp_path / "d").mkdir()
    (tmp_path / "b").mkdir()
    direct = _write_mixed(tmp_path / "d", mixed_source, True)
    buffered = _write_mixed(tmp_path / "b", mixed_source, False)
    assert direct == buffered
    assert len(direct) % sio.DIRECT_ALIGN  # the unaligned last piece was written too
    loaded = load_file(str(tmp_path / "d" / "model.safetensors"))
    assert torch.equal(loaded["odd"], torch.arange(13, dtype=torch.int8))


def test_filesystem_refusing_direct_io_gets_buffered_writes(tmp_path, mixed_source, monkeypatch):
    """open(O_DIRECT) -> EINVAL (tmpfs, some network filesystems): ordinary writes, same file."""
    import errno

    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    (tmp_path / "b").mkdir()
    want = _write_mixed(tmp_path / "b", mixed_source, False)
    monkeypatch.setattr(os, "open", no_direct)
    (tmp_path / "d").mkdir()
    assert _write_mixed(tmp_path / "d", mixed_source, True) == want


def test_direct_write_that_fails_midway_leaves_the_error_and_closes(tmp_path, monkeypatch):
    """An I/O error from the direct-I/O thread surfaces as a StorageError; abort releases everything."""
    import errno

    from adapterhub.errors import StorageError
    from adapterhub.converters.formats import shards as sio

    monkeypatch.setattr(sio, "STAGE_BYTES", sio.DIRECT_ALIGN)
    real_write = os.write

    def full(fd, data):
        if len(data) >= sio.DIRECT_ALIGN:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    t = torch.zeros(10_000)
    w = StreamingShardWriter(tmp_path, [TensorSpec("t", (10_000,), torch.float32)])
    with pytest.raises(StorageError, match="space|full"):
        w.write("t", t)
        w.close()
    w.abort()
