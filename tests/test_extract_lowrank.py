"""The low-rank factors' reported error is the true error, however it was computed."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _delta(out: int, inp: int, rank: int, noise: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(out, rank, generator=g) @ torch.randn(rank, inp, generator=g)
    return low + noise * torch.randn(out, inp, generator=g)


@pytest.mark.parametrize("method", ["randomized", "exact"])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    ("noise", "tol"),
    # Errors near 0.12 and 0.012 come from the singular values (‖ΔW‖² − Σσᵢ², float32 σᵢ): within
    # 1e-4 and 5e-3 of the float64 residual (2.3e-3 the worst seen); near 5e-3, measured: within 1e-6.
    [(0.5, 1e-4), (0.05, 5e-3), (0.02, 1e-6)],
)
def test_reported_error_is_the_residual(method: str, seed: int, noise: float, tol: float) -> None:
    from adapterhub.converters import lowrank

    D = _delta(512, 256, 16, noise, seed)
    f = lowrank.factorize(D.clone(), rank=16, method=method)
    true = float((D.double() - f.B.double() @ f.A.double()).norm() / D.double().norm())
    assert f.measured == (true < lowrank.MEASURE_BELOW)
    assert f.rel_error == pytest.approx(true, rel=tol)
    assert f.errors_by_rank[16] == pytest.approx(true, rel=tol)


def test_given_norm_is_used_and_a_non_finite_one_refused() -> None:
    from adapterhub.converters import lowrank

    D = _delta(64, 48, 4, 0.0)
    sq = lowrank.sq_norm(D)
    a = lowrank.factorize(D.clone(), rank=4, method="exact")
    b = lowrank.factorize(D.clone(), rank=4, method="exact", sq_total=sq)
    assert torch.equal(a.A, b.A) and a.kept_energy == b.kept_energy
    with pytest.raises(lowrank.NonFinite):
        lowrank.factorize(D.clone(), rank=4, sq_total=float("nan"))


@pytest.mark.parametrize("noise", [0.5, 0.05])
def test_randomized_matches_exact_on_a_noisy_low_rank_delta(noise: float) -> None:
    """One power iteration: the sketch's true error is the exact SVD's (the Eckart–Young optimum) within 1%."""
    from adapterhub.converters import lowrank

    D = _delta(512, 256, 16, noise, seed=3)
    errs = {}
    for method in ("randomized", "exact"):
        f = lowrank.factorize(D.clone(), rank=16, method=method)
        assert f.svd == method
        errs[method] = float((D.double() - f.B.double() @ f.A.double()).norm() / D.double().norm())
    assert errs["exact"] * (1 - 1e-5) <= errs["randomized"] <= 1.01 * errs["exact"]
