"""Helpers for the reliability tests: real CLI processes, kill points, a small tmpfs.

Nothing here hooks into adapterhub itself: kill points are chosen by time, or
by watching the registry's files from outside (a temp file appears, a blob is
renamed into place), which is all a crash can see too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

MB = 1 << 20
TMP_SUFFIX = ".incomplete"


# -- artifacts ------------------------------------------------------------------


def make_adapter(root: Path, seed: int, *, weights_mb: float = 2, extra_mb: tuple[float, ...] = (2, 2)) -> Path:
    """A LoRA adapter dir: ``adapter_config.json``, ``adapter_model.safetensors``,
    a README and a few extra multi-MB files, all seeded so each seed differs."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    r, hidden = 8, 256
    layers = max(1, int(weights_mb * MB) // (2 * r * hidden * 4))
    tensors = {}
    for i in range(layers):
        pre = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{pre}.lora_A.weight"] = rng.standard_normal((r, hidden)).astype(np.float32)
        tensors[f"{pre}.lora_B.weight"] = rng.standard_normal((hidden, r)).astype(np.float32)
    root.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(root / "adapter_model.safetensors"))
    (root / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": r,
                "lora_alpha": 16,
                "target_modules": ["q_proj"],
                "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
                "task_type": "CAUSAL_LM",
                "revision": f"seed-{seed}",  # so that no file is shared between seeds
            }
        )
    )
    (root / "README.md").write_text(f"# reliability fixture {seed}\n")
    for i, mb in enumerate(extra_mb):
        p = root / "extras" / f"state-{i}.bin"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(rng.bytes(int(mb * MB)))
    return root


def file_hashes(root: Path) -> dict[str, str]:
    """relpath -> sha256 of every regular file under ``root`` (what a pull must reproduce)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def artifact_digest(root: Path) -> str:
    from adapterhub.manifest import Manifest

    return Manifest.from_dir(root).digest


# -- looking at a registry from outside ------------------------------------------------


def blob_dir(home: Path) -> Path:
    return home / "blobs" / "sha256"


def stored(home: Path, shas: set[str] | None = None) -> tuple[set[str], set[str]]:
    """(complete blobs, temp files) in the store; restricted to ``shas`` when given.

    With ``shas`` only their prefix directories are listed, so this is cheap
    enough to poll every half millisecond.
    """
    base = blob_dir(home)
    dirs: list[Path]
    if shas is not None:
        # sha256/tmp/ holds one-pass copies whose digest is not known yet:
        # they may be any of ``shas``.
        dirs = [base / p for p in {s[:2] for s in shas}] + [base / "tmp"]
    else:
        try:
            dirs = [Path(e.path) for e in os.scandir(base) if e.is_dir()]
        except FileNotFoundError:
            return set(), set()
    blobs, temps = set(), set()
    for d in dirs:
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            continue
        for n in names:
            if n.endswith(TMP_SUFFIX):
                if shas is None or n[:64] in shas or d.name == "tmp":
                    temps.add(n)
            elif shas is None or n in shas:
                blobs.add(n)
    return blobs, temps


def seed_garbage(home: Path, n_blobs: int, n_temps: int, *, size: int = 2048, prefix: str = "") -> set[str]:
    """Leave what killed pushes leave: unreferenced blobs and ``.incomplete`` files.

    With ``prefix`` every blob's sha256 starts with it, so they all land in
    one directory of the store (found by trying salts: ~256 hashes a blob).
    """
    base = blob_dir(home)
    shas = set()
    while len(shas) < n_blobs:
        data = secrets.token_bytes(size)
        sha = hashlib.sha256(data).hexdigest()
        if not sha.startswith(prefix):
            continue
        p = base / sha[:2] / sha
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.chmod(p, 0o444)
        shas.add(sha)
    for _ in range(n_temps):
        sha = secrets.token_hex(32)
        p = base / sha[:2] / f"{sha}.{secrets.token_hex(6)}{TMP_SUFFIX}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
    return shas


# -- processes -------------------------------------------------------------------------


def spawn(*args: object, home: Path | None = None, stdout: int | None = subprocess.PIPE) -> subprocess.Popen:
    """Start ``python -m adapterhub.cli ARGS`` (stdout/stderr captured).

    Pass ``stdout=subprocess.DEVNULL`` for commands whose output may outgrow a
    pipe (a gc plan) while nobody reads it yet.
    """
    env = dict(os.environ)
    if home is not None:
        env["ADAPTERHUB_HOME"] = str(home)
    return subprocess.Popen(
        [sys.executable, "-m", "adapterhub.cli", *map(str, args)],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # A shell without job control starts background commands with SIGINT
        # ignored, and the ignore is inherited: a test run started with `&`
        # would then spawn a CLI that Ctrl-C cannot stop. The CLI gets the
        # default disposition, as in a terminal.
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def signal_when(
    proc: subprocess.Popen, ready: Callable[[], bool], sig: int = 9, timeout: float = 60.0
) -> tuple[bool, str, str]:
    """Send ``sig`` to ``proc`` as soon as ``ready()`` is true; wait for it to end.

    Returns (sent, stdout, stderr): ``sent`` is True if the signal went to a
    process that was still running, False if it finished first (or ``ready``
    never became true).
    """
    deadline = time.monotonic() + timeout
    sent = False
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if ready():
            try:
                proc.send_signal(sig)
                sent = True
            except ProcessLookupError:
                pass
            break
        time.sleep(0.0005)
    else:
        proc.kill()
    out, err = proc.communicate(timeout=timeout)
    return sent, out, err


def signal_after(proc: subprocess.Popen, delay: float, sig: int = 9) -> tuple[bool, str, str]:
    t0 = time.monotonic()
    return signal_when(proc, lambda: time.monotonic() - t0 >= delay, sig)


def sweep(duration: float, steps: int) -> list[float]:
    """``steps`` delays spread evenly over [0, duration]."""
    return [duration * i / (steps - 1) for i in range(steps)]


# -- a small filesystem that fills up ------------------------------------------------------


class MountRefused(Exception):
    pass


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` at ``path`` for the duration; unmount in ``finally``."""
    if shutil.which("mount") is None:
        raise MountRefused("no `mount` command")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise MountRefused(f"mount -t tmpfs failed: {r.stderr.strip() or r.returncode}")
    try:
        yield path
    finally:
        r = subprocess.run(["umount", str(path)], capture_output=True, text=True)
        if r.returncode != 0:  # something still has a file open there
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def resize_tmpfs(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, capture_output=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int) -> Path:
    """Fill the filesystem at ``path`` until about ``leave`` bytes are free."""
    filler = path / "filler"
    n = max(0, free_bytes(path) - leave)
    with open(filler, "wb") as f:
        while n > 0:
            chunk = min(n, MB)
            try:
                f.write(b"\0" * chunk)
                f.flush()
            except OSError:
                break
            n -= chunk
    return filler
