"""How a spec on the command line becomes an input: a path, a registry ref or a cached Hub id."""

import pytest

from adapterhub.errors import NotFoundError
from adapterhub.sources import resolve_source

from ._hf_cache import cache_snapshot


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    cache_snapshot(cache, "Org/Model", {"config.json": b"{}"})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_a_cached_hub_id_resolves(hf_cache):
    src = resolve_source("Org/Model")
    assert src.origin == "hf-cache" and src.hub_id == "Org/Model" and set(src.files) == {"config.json"}


@pytest.mark.parametrize("spec", ["Org/Model\n", "Org/Model\nx", "Org/Model/extra", "Org/Mo del"])
def test_a_hub_id_with_anything_more_is_not_a_hub_id(hf_cache, spec):
    """The whole spec must be ORG/NAME: a trailing newline is not looked up in the cache (nor a crash there)."""
    with pytest.raises(NotFoundError, match="not a valid registry ref or Hub model id"):
        resolve_source(spec)
