"""Our safetensors header checks against the reference parser: the same verdict on every generated file.

adapterhub.inspect.safetensors validates headers itself (the reference's
Python binding imports numpy, too slow for push's start-up), so this file
keeps the two in step: hypothesis builds small files, well-formed and then
broken in the ways the format can break (gaps, overlaps, trailing or missing
bytes, offsets out of order, byte counts that do not match the dtype and
shape, sub-byte dtypes that end mid-byte, metadata that is not a map of
strings, whitespace before the JSON), and each file must be accepted by both
``read_header`` and ``safetensors.safe_open`` or refused by both.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import hypothesis
import pytest
from hypothesis import strategies as st
from safetensors import safe_open

from adapterhub.errors import InvalidArtifactError
from adapterhub.inspect.safetensors import DTYPE_BITS, read_header

DTYPES = ["F32", "F16", "BF16", "U8", "I64", "F4", "BOOL"]

TENSORS = st.lists(
    st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), max_size=3)),
    max_size=4,
)
MUTATIONS = st.sampled_from(
    ["none", "gap", "overlap", "trailing", "short", "swap", "size", "meta_int", "meta_list", "meta_null",
     "meta_empty_string", "meta_strings", "space", "zero_first"]
)


def build(tensors: list[tuple[str, list[int]]], mutation: str, k: int) -> bytes:
    header: dict[str, object] = {}
    at = 0
    for i, (dtype, shape) in enumerate(tensors):
        n = math.prod(shape) * DTYPE_BITS[dtype]
        nbytes = -(-n // 8)  # F4 with an odd count ends mid-byte: the reference refuses it
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + nbytes]}
        at += nbytes
    data_len = at
    keys = list(header)
    pick = keys[k % len(keys)] if keys else None
    if mutation == "gap" and pick:
        for key in keys[keys.index(pick):]:
            header[key]["data_offsets"] = [x + 1 for x in header[key]["data_offsets"]]  # type: ignore[index]
        data_len += 1
    elif mutation == "overlap" and pick and keys.index(pick) > 0:
        b, e = header[pick]["data_offsets"]  # type: ignore[index]
        header[pick]["data_offsets"] = [max(0, b - 1), e - 1 if e > b else e]  # type: ignore[index]
    elif mutation == "trailing":
        data_len += 1 + k % 3
    elif mutation == "short" and data_len:
        data_len -= 1
    elif mutation == "swap" and len(keys) > 1:
        a, b = keys[0], keys[-1]
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]  # type: ignore[index]
    elif mutation == "size" and pick:
        header[pick]["shape"] = header[pick]["shape"] + [2]  # type: ignore[operator,index]
    elif mutation == "meta_int":
        header["__metadata__"] = {"format": 1}
    elif mutation == "meta_list":
        header["__metadata__"] = ["pt"]
    elif mutation == "meta_null":
        header["__metadata__"] = None
    elif mutation == "meta_empty_string":
        header["__metadata__"] = ""
    elif mutation == "meta_strings":
        header["__metadata__"] = {"format": "pt", "note": "x"}
    elif mutation == "zero_first" and pick:
        header[pick]["data_offsets"] = [0, 0]  # type: ignore[index]
    text = json.dumps(header).encode()
    if mutation == "space":
        text = b" " + text
    return struct.pack("<Q", len(text)) + text + bytes(range(256)) * (data_len // 256) + bytes(data_len % 256)


def ours(path: Path) -> bool:
    try:
        read_header(path)
    except InvalidArtifactError:
        return False
    return True


def reference(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="numpy") as f:
            f.keys()
    except Exception:  # noqa: BLE001 - SafetensorError has no stable import path
        return False
    return True


@hypothesis.settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(tensors=TENSORS, mutation=MUTATIONS, k=st.integers(0, 7))
def test_same_verdict_as_the_reference(tmp_path: Path, tensors: list[tuple[str, list[int]]], mutation: str, k: int) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(build(tensors, mutation, k))
    assert ours(path) == reference(path), (mutation, tensors, k, path.read_bytes()[:300])


@pytest.mark.parametrize(
    "mutation, expect",
    [("none", True), ("gap", False), ("overlap", False), ("trailing", False), ("short", False), ("size", False),
     ("meta_int", False), ("meta_list", False), ("meta_null", True), ("meta_strings", True)],
)
def test_each_rule_on_a_plain_file(tmp_path: Path, mutation: str, expect: bool) -> None:
    """The cases the property test draws, pinned: each rule refuses (or accepts) on its own."""
    path = tmp_path / "x.safetensors"
    path.write_bytes(build([("F32", [2, 3]), ("BF16", [4]), ("U8", [5])], mutation, 1))
    assert (ours(path), reference(path)) == (expect, expect)


def test_a_gap_is_named(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(build([("F32", [2]), ("F32", [2])], "gap", 1))
    with pytest.raises(InvalidArtifactError, match=r"x.safetensors: tensor 't1' starts at data byte 9 and leaves a gap of 1 bytes"):
        read_header(path)


def test_an_odd_f4_count_ends_mid_byte(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(build([("F4", [3])], "none", 0))
    assert (ours(path), reference(path)) == (False, False)
