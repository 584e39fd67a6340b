"""Smoke test of an installed adapterhub core: the commands a team runs first.

    python scripts/smoke_core.py            # with the interpreter of the install to test

Run by .ci/run in a fresh virtual environment that holds only the wheel (no
torch): `adapterhub --help`, then inspect, push, pull and check on a tiny LoRA
adapter and a base written here with numpy and safetensors (core
dependencies). It runs from a temporary directory, so the source tree cannot
stand in for a missing module or file of the wheel. Exits non-zero, with the
failing step, on any problem.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

H, R = 16, 4


def step(argv: list[str], env: dict[str, str], expect: int = 0) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("adapterhub")  # the console script of this install
    r = subprocess.run([str(exe), *argv], capture_output=True, text=True, env=env)
    print(f"$ adapterhub {' '.join(argv)}  -> {r.returncode}")
    if r.returncode != expect:
        sys.exit(f"smoke test failed: `adapterhub {' '.join(argv)}` exited {r.returncode}, expected {expect}\n{r.stdout}{r.stderr}")
    return r


def build(work: Path) -> tuple[Path, Path]:
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    base, adapter = work / "base", work / "adapter"
    base.mkdir()
    adapter.mkdir()
    weights = {"model.embed_tokens.weight": rng.standard_normal((32, H)).astype(np.float32)}
    lora = {}
    for i in range(2):
        for m in ("q_proj", "v_proj"):
            weights[f"model.layers.{i}.self_attn.{m}.weight"] = rng.standard_normal((H, H)).astype(np.float32)
            pre = f"base_model.model.model.layers.{i}.self_attn.{m}"
            lora[f"{pre}.lora_A.weight"] = rng.standard_normal((R, H)).astype(np.float32)
            lora[f"{pre}.lora_B.weight"] = rng.standard_normal((H, R)).astype(np.float32)
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "num_hidden_layers": 2,
        "num_attention_heads": 2, "vocab_size": 32, "torch_dtype": "float32",
    }))
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": 2 * R,
        "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": str(base),
    }))
    return base, adapter


def main() -> None:
    for heavy in ("torch", "transformers", "peft"):
        if importlib.util.find_spec(heavy) is not None:
            print(f"note: {heavy} is importable here; the core must not need it")
    with tempfile.TemporaryDirectory(prefix="adapterhub-smoke-") as td:
        work = Path(td)
        os.chdir(work)  # never the source tree
        env = {**os.environ, "ADAPTERHUB_HOME": str(work / "home"), "HF_HUB_OFFLINE": "1"}
        base, adapter = build(work)
        assert "push" in step(["--help"], env).stdout
        ins = json.loads(step(["inspect", str(adapter), "--json"], env).stdout)
        assert (ins["kind"], ins["method"], ins["rank"]) == ("adapter", "LORA", R), ins
        pushed = json.loads(step(["push", str(adapter), "smoke/lora", "--tag", "ci", "--json"], env).stdout)
        assert pushed["ref"] == "smoke/lora:1", pushed
        assert json.loads(step(["inspect", "smoke/lora@ci", "--json"], env).stdout)["rank"] == R
        step(["pull", "smoke/lora@ci", str(work / "pulled")], env)
        for f in adapter.iterdir():
            if (work / "pulled" / f.name).read_bytes() != f.read_bytes():
                sys.exit(f"smoke test failed: pulled {f.name} differs")
        report = json.loads(step(["check", "smoke/lora:1", "--base", str(base), "--json"], env).stdout)
        assert report["status"] in ("ok", "warnings"), report["status"]
        step(["fsck"], env)
        import adapterhub

        print(f"core smoke test passed: adapterhub {adapterhub.__version__} from {Path(adapterhub.__file__).parent}")


if __name__ == "__main__":
    main()
