import json
import os

import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import load_file, save_file  # noqa: E402

from adapterhub.errors import ConflictError, InvalidArtifactError, UnsafePathError  # noqa: E402
from converters.safetensors_io import (  # noqa: E402
    INDEX_NAME,
    StreamingShardWriter,
    TensorSource,
    TensorSpec,
    file_map,
    staged_dir,
)


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
