"""inspect.patterns: rank_pattern/alpha_pattern keys matched as PEFT matches them, in bounded time."""

from __future__ import annotations

import re

import pytest

from adapterhub.errors import InvalidArtifactError
from adapterhub.inspect import patterns
from adapterhub.inspect.patterns import find_pattern_key, fullmatch, get_pattern_key, suffix_match

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


def peft_get_pattern_key(keys, module):
    """peft.utils.other.get_pattern_key, as PEFT 0.21 writes it (the reference)."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def test_peft_semantics_on_module_names():
    keys = ["layers.0.self_attn.q_proj", "q_proj|v_proj", r"^model\.layers\.1\.", "mlp.*", "k_proj$"]
    for module in (
        "model.layers.0.self_attn.q_proj",  # the literal key, at a component boundary
        "model.layers.3.self_attn.v_proj",  # the alternation
        "model.layers.1.mlp.up_proj",  # "mlp.*" from a boundary
        "model.layers.2.self_attn.xq_proj",  # no boundary before q_proj: no key
        "model.layers.2.self_attn.k_proj",
        "layersX0.self_attnXq_proj",  # "." in a key is any character, as in PEFT
        "",
    ):
        assert get_pattern_key(keys, module) == peft_get_pattern_key(keys, module), module


def test_peft_itself_agrees():
    from peft.utils.other import get_pattern_key as peft_gpk

    keys = ["layers.0.self_attn.q_proj", "q_proj|v_proj", "(down|up)_proj"]
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.9.mlp.up_proj", "lm_head"):
        assert get_pattern_key(keys, module) == peft_gpk(keys, module)


@pytest.mark.parametrize(
    "key,module",
    [
        ("(a+)+b", "model." + "a" * 5000),
        ("(a|a)*b", "a" * 5000),
        ("(a|aa)+$x", "a" * 3000),
        ("(.*a){20}", "a" * 200 + "b"),
        ("(\\w+\\s?)+$", "word " * 400 + "!"),
    ],
)
def test_catastrophic_keys_answer_at_once(key, module):
    # The same answer as re gives (it would take hours here); the NFA has no backtracking to explode.
    assert suffix_match(key, module) is False
    assert fullmatch(key, module) is False
    assert find_pattern_key([key, "q_proj"], module + "!.q_proj") in (key, "q_proj")  # answered, whichever


def test_a_catastrophic_key_does_not_shadow_the_next():
    assert find_pattern_key(["(a+)+b", "q_proj"], "model." + "a" * 3000 + ".q_proj") == "q_proj"


def test_constructs_the_nfa_cannot_express_run_with_a_time_limit(monkeypatch):
    # A backreference: re in a child process, bounded by TIMEOUT_S.
    # PEFT wraps the key in (.*\.)?(...)$: the key's own first group is group 3
    assert suffix_match(r"(q)_proj\.\3", "layers.0.q_proj.q") is True
    assert suffix_match(r"(q)_proj\.\3", "layers.0.q_proj.k") is False
    assert suffix_match(r"(?=q_)q_proj", "layers.0.q_proj") is True
    monkeypatch.setattr(patterns, "TIMEOUT_S", 0.5)
    with pytest.raises(InvalidArtifactError, match="did not finish matching within 0.5 s"):
        suffix_match(r"(a+)+\1b", "a" * 64)


def test_invalid_and_oversized_patterns_are_named():
    with pytest.raises(InvalidArtifactError, match=r"rank_pattern: '\(' is not a valid regular expression"):
        find_pattern_key(["("], "x")
    with pytest.raises(InvalidArtifactError, match="pattern of 5001 characters"):
        suffix_match("a" * 5001, "a")
    assert patterns.pattern_problem("q_proj") is None and "not a valid" in patterns.pattern_problem("[a")


# ---- the NFA against re, on generated patterns and strings

ATOMS = ["a", "b", ".", r"\.", "[ab]", "[^a]", r"\d", r"\w", r"\s", r"\b", r"\B", "$", "^", r"\Z", "_", "1"]


@st.composite
def regexes(draw, depth=0):
    if depth >= 3 or draw(st.integers(0, 9)) < 4:
        return draw(st.sampled_from(ATOMS))
    kind = draw(st.sampled_from(["seq", "alt", "rep", "group"]))
    a = draw(regexes(depth + 1))
    if kind == "seq":
        return a + draw(regexes(depth + 1))
    if kind == "alt":
        return f"({a}|{draw(regexes(depth + 1))})"
    if kind == "rep":
        return f"({a}){draw(st.sampled_from(['*', '+', '?', '{2}', '{0,3}', '*?', '+?', '{1,}']))}"
    return f"(?:{a})"


@hypothesis.settings(max_examples=300, deadline=None, derandomize=True)
@hypothesis.given(regexes(), st.lists(st.text(alphabet="ab._1 \n", max_size=10), min_size=1, max_size=6))
def test_nfa_agrees_with_re(key, strings):
    try:
        re.compile(rf"(.*\.)?({key})$")
        re.compile(key)
    except re.error:
        return
    for s in strings:
        assert suffix_match(key, s) == bool(re.match(rf"(.*\.)?({key})$", s)), (key, s)
        assert fullmatch(key, s) == bool(re.fullmatch(key, s)), (key, s)
