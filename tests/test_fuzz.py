"""Property-based fuzzing (issue 16): mutated safetensors headers, adapter configs and
GGUF metadata through ``inspect``, ``check`` and ``push``.

Every run must end in a documented exit code with a one-line error: never
"unexpected error" (exit 1 from a crash), a traceback or a hang. Hangs are
caught by an alarm around each command (a bound, not a timing assertion).

The example counts keep the file well under a minute on two cores; set
ADAPTERHUB_FUZZ_EXAMPLES to run more locally. Examples are derandomized so CI
runs are reproducible.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from adapterhub.errors import EXIT_CODES

from .factories import fake_lora, gguf_file, write_safetensors_header

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

EXAMPLES = int(os.environ.get("ADAPTERHUB_FUZZ_EXAMPLES", "30"))
HANG_S = 30  # far above any single command here (they take milliseconds)
H, L, V = 32, 2, 64

# Exit codes each command may end in (errors.EXIT_CODES documents them all); 1 is "unexpected
# error" except for check, where it means "incompatible" and the message tells them apart.
ALLOWED = {"inspect": {0, 2, 3, 4}, "push": {0, 2, 3, 4, 5, 6, 7}, "check": {0, 1, 2, 3, 4}}
SETTINGS = hypothesis.settings(
    max_examples=EXAMPLES,
    deadline=None,  # the alarm bounds each command instead
    derandomize=True,
    suppress_health_check=list(hypothesis.HealthCheck),
    database=None,
)


class Hang(BaseException):
    """Raised by the alarm: a BaseException so that no handler in the CLI maps it to an exit code."""


@contextmanager
def bounded(seconds: int):
    def fire(*_: Any) -> None:
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real inputs to mutate: a LoRA, a header-only Llama base and a GGUF LoRA."""
    root = tmp_path_factory.mktemp("fuzz")
    base = root / "base"
    base.mkdir()
    tensors = {"model.embed_tokens.weight": ("F32", (V, H)), "lm_head.weight": ("F32", (V, H)), "model.norm.weight": ("F32", (H,))}
    for i in range(L):
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"model.layers.{i}.self_attn.{m}.weight"] = ("F32", (H, H))
    write_safetensors_header(base / "model.safetensors", tensors)
    (base / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "num_hidden_layers": L,
        "vocab_size": V, "tie_word_embeddings": False, "torch_dtype": "float32",
    }))
    return {
        "base": base,
        "lora": fake_lora(root / "lora", hidden=H, layers=L),
        "gguf": gguf_file(root / "gguf" / "a.gguf", hidden_size=H, layers=L, vocab=V, adapter=True, r=4),
    }


def run_all(world: dict[str, Path], target: Path, home: Path, commands=("inspect", "push", "check")) -> None:
    from adapterhub.cli import cli

    runner = CliRunner()
    env = {"ADAPTERHUB_HOME": str(home), "HF_HUB_OFFLINE": "1", "ADAPTERHUB_DEBUG": ""}
    args = {
        "inspect": ["inspect", str(target), "--json"],
        "push": ["push", str(target), "fuzz/x"],
        "check": ["check", str(target), "--base", str(world["base"]), "--json"],
    }
    for cmd in commands:
        with bounded(HANG_S):
            r = runner.invoke(cli, args[cmd], env=env, catch_exceptions=False)
        out = r.output
        assert r.exit_code in EXIT_CODES and r.exit_code in ALLOWED[cmd], (cmd, r.exit_code, out[-2000:])
        assert "unexpected error" not in out and "Traceback" not in out, (cmd, out[-2000:])
        if r.exit_code not in (0, 1) or (cmd != "check" and r.exit_code):
            errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
            assert len(errors) == 1, (cmd, r.stderr)


def copy_tree(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


# --------------------------------------------------------------------------- values

NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2**63, 2**64, 2**64 - 1, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=12), st.sampled_from(["(a+)+b", "(", "q_proj", "F32", "LORA", ""]))
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


# --------------------------------------------------------------------------- safetensors headers


def _split_safetensors(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


HEADER_MUTATIONS = st.one_of(
    st.tuples(st.just("field"), st.sampled_from(["dtype", "shape", "data_offsets"]), JSON),
    st.tuples(st.just("drop"), st.sampled_from(["dtype", "shape", "data_offsets"]), st.none()),
    st.tuples(st.just("entry"), st.none(), JSON),
    st.tuples(st.just("metadata"), st.none(), JSON),
    st.tuples(st.just("offsets"), st.none(), st.lists(NUMBERS, min_size=2, max_size=2)),
    st.tuples(st.just("shape"), st.none(), st.lists(st.integers(-3, 2**40), max_size=5)),
    st.tuples(st.just("length"), st.none(), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("truncate"), st.none(), st.integers(0, 400)),
    st.tuples(st.just("deep"), st.none(), st.integers(10, 3000)),
)


@SETTINGS
@hypothesis.given(mutation=HEADER_MUTATIONS, which=st.integers(0, 3))
def test_fuzz_safetensors_header(world, mutation, which):
    kind, field, value = mutation
    with tempfile.TemporaryDirectory() as tmp:
        d = copy_tree(world["lora"], Path(tmp) / "a")
        st_file = d / "adapter_model.safetensors"
        header, data = _split_safetensors(st_file)
        key = sorted(k for k in header if k != "__metadata__")[which % 4]
        length = None
        if kind == "field":
            header[key][field] = value
        elif kind == "drop":
            header[key].pop(field)
        elif kind == "entry":
            header[key] = value
        elif kind == "metadata":
            header["__metadata__"] = value
        elif kind == "offsets":
            header[key]["data_offsets"] = value
        elif kind == "shape":
            header[key]["shape"] = value
        elif kind == "deep":
            header[key]["shape"] = "__DEEP__"
        text = json.dumps(header)
        if kind == "deep":
            text = text.replace('"__DEEP__"', "[" * value + "]" * value)
        blob = text.encode()
        if kind == "length":
            length = value
        raw = struct.pack("<Q", len(blob) if length is None else length) + blob + data
        if kind == "truncate":
            raw = raw[: value]
        st_file.write_bytes(raw)
        run_all(world, d, Path(tmp) / "home")


# --------------------------------------------------------------------------- adapter configs

CONFIG_KEYS = [
    "peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "modules_to_save",
    "use_dora", "use_rslora", "fan_in_fan_out", "base_model_name_or_path", "revision", "task_type",
    "layers_to_transform", "init_lora_weights", "bias", "feedforward_modules", "exclude_modules",
]
PATTERNS = st.dictionaries(
    st.sampled_from(["q_proj", "(a+)+b", "(", "layers.0.self_attn.q_proj", ".*", "v_proj|q_proj", "a" * 5000]),
    st.one_of(st.integers(-2, 64), st.floats(allow_nan=True), st.text(max_size=3)),
    max_size=3,
)


@SETTINGS
@hypothesis.given(
    changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), st.one_of(JSON, PATTERNS), min_size=1, max_size=4),
    depth=st.one_of(st.none(), st.integers(50, 5000)),
)
def test_fuzz_adapter_config(world, changes, depth):
    with tempfile.TemporaryDirectory() as tmp:
        d = copy_tree(world["lora"], Path(tmp) / "a")
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(changes)
        text = json.dumps(cfg)
        if depth is not None:
            text = text[:-1] + ', "nested": ' + "[" * depth + "]" * depth + "}"
        (d / "adapter_config.json").write_text(text)
        run_all(world, d, Path(tmp) / "home")


# --------------------------------------------------------------------------- GGUF metadata

GGUF_MUTATIONS = st.one_of(
    # overwrite 1, 4 or 8 bytes of the header (counts, lengths, value types) at a random place
    st.tuples(st.just("bytes"), st.integers(4, 4000), st.sampled_from([1, 4, 8]), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("truncate"), st.integers(0, 4000), st.none(), st.none()),
)


@SETTINGS
@hypothesis.given(mutations=st.lists(GGUF_MUTATIONS, min_size=1, max_size=3))
def test_fuzz_gguf_metadata(world, mutations):
    raw = bytearray(world["gguf"].read_bytes())
    for kind, pos, width, value in mutations:
        if kind == "truncate":
            raw = raw[:pos]
        elif pos + width <= len(raw):
            raw[pos : pos + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "a.gguf"
        f.write_bytes(bytes(raw))
        run_all(world, f, Path(tmp) / "home")


def test_the_fuzzed_inputs_are_valid_to_begin_with(world, tmp_path):
    """The unmutated inputs pass everything: the fuzz starts from real files."""
    from adapterhub.inspect import inspect_path

    assert inspect_path(world["lora"]).rank == 8 and inspect_path(world["gguf"]).format == "gguf"
    run_all(world, world["lora"], tmp_path / "home")
