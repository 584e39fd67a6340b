"""llm_int8_skip_modules patterns (issue 16, catastrophic regexes): transformers' answer, in bounded time.

transformers skips quantizing a module when a pattern matches it from the
start up to a module boundary, or when the name ends with the pattern
(``quantizers_utils.should_convert_module``). The patterns and the module
names both come from the checkpoint, so ``bnb_layout._matches`` runs the regex
test on the bounded matcher of ``adapterhub.inspect.patterns``.
"""

from __future__ import annotations

import re

import pytest

from adapterhub.converters.formats import bnb_layout
from adapterhub.converters.formats.safetensors_io import TensorSpec
from adapterhub.inspect import patterns

KEYS = [
    "lm_head", "q_proj", "layers.1", "layers.1.", "layer.*", "mlp.gate", "mlp.gate_proj", r"layers\.\d+\.mlp",
    "model.layers.0", "(q|k)_proj", "self_attn", "attn$", "x$", r"mlp\b", "(?<!a)q_proj", "q(?=_)", "q(?!_)",
    ".*", "", "a|b", "layers.[0-3]", r"layers\.1(?=\.)", "model", "[.]", "(?s:.)*proj", "(?i)q", "([)",
]
MODULES = [
    "lm_head", "model.lm_head", "model.layers.1.mlp.gate", "model.layers.11.mlp.gate_proj", "layers.1.mlp",
    "layers.11.mlp", "layers.1", "layers.10", "mlp.gate_proj", "mlp.gate", "mlp.gate.x", "q_proj",
    "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn", "x", "x\n", "a", "b", "ab", "", ".",
    "layers.3.attn", "model.embed_tokens", "qproj",
]


def _transformers_skips(module: str, key: str) -> bool | None:
    """not should_convert_module(module, [key]); None where transformers raises (not a regex)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    try:
        return not should_convert_module(module, [key])
    except re.error:
        return None


def test_skip_patterns_match_what_transformers_matches():
    pytest.importorskip("transformers")
    compared = 0
    for key in KEYS:
        for module in MODULES:
            want = _transformers_skips(module, key)
            if want is None:  # transformers raises; we test the suffix alone
                assert bnb_layout._matches(module, [key]) == module.endswith(key), (key, module)
                continue
            assert bnb_layout._matches(module, [key]) is want, (key, module)
            compared += 1
    assert compared > 500


def test_boundary_match_is_re_with_transformers_boundary():
    """The look-arounds of the boundary run on the NFA itself, not the timed child."""
    for key in KEYS[:-3]:  # then an inline flag (the timed child) and two that are not regular expressions
        p = patterns._boundary_pattern(key, "t")
        assert p.nfa is not None, key
        for module in MODULES:
            assert patterns.boundary_match(key, module) is bool(re.match(rf"(?:{key}){patterns.BOUNDARY}", module)), (key, module)


def test_catastrophic_skip_pattern_answers_at_once():
    """``(a+)+b`` against a name of a's: hours in ``re`` (2^n paths), no backtracking here."""
    module = "model." + "a" * 60
    assert bnb_layout._matches(module, ["(a+)+b"]) is False
    assert bnb_layout._matches(module + ".b", ["(a+)+b"]) is False  # `model.` is not matched by (a+)+
    assert bnb_layout._matches("a" * 60 + "b.mlp", ["(a+)+b"]) is True
    assert bnb_layout._matches("a" * 60, ["(a+)+b", "a"]) is True  # the next key still counts (suffix)
    spec = TensorSpec("a" * 60 + ".x.weight", (64, 64), "float16")
    assert bnb_layout.should_quantize(spec, {"model_type": "llama"}, skip_modules=["(a+)+b"]) is True
    skipped = TensorSpec("a" * 60 + "b.weight", (64, 64), "float16")
    assert bnb_layout.should_quantize(skipped, {"model_type": "llama"}, skip_modules=["(a+)+b"]) is False


def test_a_skip_pattern_that_needs_the_timed_matcher_fails_clearly(monkeypatch):
    """A backreference cannot run on the NFA: re in a child with a time limit, then a clear error."""
    from adapterhub.errors import InvalidArtifactError

    monkeypatch.setattr(patterns, "TIMEOUT_S", 0.5)
    with pytest.raises(InvalidArtifactError, match="llm_int8_skip_modules.*did not finish matching"):
        bnb_layout._matches("a" * 64, [r"(a+)+\1b"])


def test_skip_patterns_agree_with_transformers_on_random_keys():
    pytest.importorskip("transformers")
    hyp = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    pieces = ["a", "b", ".", r"\.", "a*", "(a|b)", "[ab]", "$", "^", "+", "?", r"\d", "1", "(?=\\.)", "(?<=a)", "(?!b)"]
    names = st.text(alphabet="ab.1", max_size=12)

    @hyp.settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @hyp.given(st.lists(st.sampled_from(pieces), max_size=6).map("".join), names)
    def check(key: str, module: str) -> None:
        want = _transformers_skips(module, key)
        if want is not None:
            assert bnb_layout._matches(module, [key]) is want

    check()


def test_verify_gives_transformers_module_names_not_patterns():
    """verify's same-recipe reference hands transformers the modules each entry selects, escaped:
    the same modules are skipped, and no entry of the checkpoint is run as a regular expression."""
    pytest.importorskip("transformers")
    from adapterhub.errors import InvalidArtifactError
    from adapterhub.verify.loading import skip_modules

    modules = [m for m in MODULES if m]  # a module is never nameless
    compared = 0
    for key in KEYS:
        if patterns.pattern_problem(key) is not None:
            with pytest.raises(InvalidArtifactError, match="llm_int8_skip_modules"):
                skip_modules([key], modules)
            continue
        safe = skip_modules([key], modules)
        # a plain module path is kept; anything else became escaped module names
        assert safe == [key] if re.fullmatch(r"[\w.-]+", key, re.ASCII) else set(safe) <= {re.escape(m) + r"\Z" for m in modules}
        for module in modules:
            assert (not should_convert(module, safe)) is _transformers_skips(module, key), (key, module, safe)
            compared += 1
    assert compared > 400
    assert skip_modules(None, modules) is None and skip_modules("lm_head", modules) == ["lm_head"]


def test_verify_defuses_a_catastrophic_skip_module():
    """``(a+)+b`` would run for hours in transformers' re.match against a name of a's."""
    pytest.importorskip("transformers")
    from adapterhub.verify.loading import skip_modules

    names = ["model." + "a" * 60, "a" * 60 + "b.mlp", "a" * 60]
    safe = skip_modules(["(a+)+b", "lm_head"], names)
    assert safe == [re.escape("a" * 60 + "b.mlp") + r"\Z", "lm_head"]
    assert [should_convert(n, safe) for n in names] == [True, False, True]


def should_convert(module: str, skip: list[str]) -> bool:
    from transformers.quantizers.quantizers_utils import should_convert_module

    return should_convert_module(module, skip)
