"""The extraction reader: float32 deltas formed block by block from the two files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")


def _pair(tmp_path: Path, model: dict, base: dict):
    from safetensors.torch import save_file

    from adapterhub.converters.formats.safetensors_io import TensorSource, file_map

    for name, sd in (("model", model), ("base", base)):
        (tmp_path / name).mkdir()
        save_file(sd, tmp_path / name / "model.safetensors")
    return TensorSource(file_map(tmp_path / "model")), TensorSource(file_map(tmp_path / "base"))


@pytest.mark.parametrize(
    ("block_bytes", "window_bytes"),
    # a row per block; three rows per block, two blocks per window; one block, several windows; one of each
    [(1, 1), (4 * 24 * 3, 2 * 24 * 6), (1 << 20, 24 * 2 * 5), (1 << 20, 1 << 20)],
)
def test_delta_block_by_block(tmp_path: Path, block_bytes: int, window_bytes: int) -> None:
    from adapterhub.converters.extract_read import DeltaReader

    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 24, generator=g).bfloat16()
    M = W.clone()
    M[7] += 1.0  # one row changed, and a block of rows further on
    M[30:33] -= 0.5
    E = torch.randn(16, 8, generator=g)
    m, b = _pair(tmp_path, {"w": M, "same": E, "f32": E + 1}, {"w": W, "same": E.clone(), "f32": E.bfloat16()})
    r = DeltaReader(m, b, block_bytes=block_bytes, window_bytes=window_bytes)
    try:
        d = r.delta("w", 0)
        want = M.float() - W.float()
        assert d.delta is not None and torch.equal(d.delta, want) and d.dtype == torch.bfloat16
        assert d.sq_norm == pytest.approx(float(want.double().pow(2).sum()), rel=1e-6)
        assert r.delta("same", 1).delta is None  # equal bytes: no delta
        # Another dtype in BASE: compared by value, converted block by block.
        d2 = r.delta("f32", 1)
        assert d2.delta is not None and torch.equal(d2.delta, (E + 1) - E.bfloat16().float())
        # The first buffer still holds the first delta: two slots alternate.
        assert torch.equal(d.delta, want)
    finally:
        r.close()


def test_equal_values_in_another_dtype_or_signed_zeros_are_unchanged(tmp_path: Path) -> None:
    from adapterhub.converters.extract_read import DeltaReader

    E = torch.randn(8, 8).bfloat16()
    Z = torch.zeros(4, 4)
    m, b = _pair(tmp_path, {"e": E, "z": -Z}, {"e": E.float(), "z": Z})
    r = DeltaReader(m, b, block_bytes=64)
    try:
        assert r.delta("e", 0).delta is None
        assert r.delta("z", 1).delta is None  # -0.0 and 0.0: the bytes differ, the delta is zero
    finally:
        r.close()


def test_a_file_cut_short_is_an_error_not_a_crash(tmp_path: Path) -> None:
    """A mapped read past the end of a file would be SIGBUS: the size is checked before mapping."""
    import os

    from adapterhub.converters.extract_read import DeltaReader
    from adapterhub.errors import InvalidArtifactError

    W = torch.zeros(64, 32)
    m, b = _pair(tmp_path, {"w": W + 1}, {"w": W})
    path = tmp_path / "base" / "model.safetensors"
    os.truncate(path, path.stat().st_size - 100)  # after the sources were opened
    r = DeltaReader(m, b, window_bytes=1024)
    try:
        with pytest.raises(InvalidArtifactError, match="truncated"):
            r.delta("w", 0)
    finally:
        r.close()


def test_non_finite_delta_has_a_non_finite_norm(tmp_path: Path) -> None:
    from adapterhub.converters.extract_read import DeltaReader

    W = torch.zeros(6, 5)
    M = W.clone()
    M[4, 2] = math.inf
    m, b = _pair(tmp_path, {"w": M, "n": W.clone()}, {"w": W, "n": W.clone().fill_(math.nan)})
    r = DeltaReader(m, b, block_bytes=20)
    try:
        assert math.isnan(r.delta("w", 0).sq_norm)
        assert math.isnan(r.delta("n", 1).sq_norm)
    finally:
        r.close()
