"""Push and pull of a ~1 GB artifact to a loopback OCI registry, against raw HTTP.

Starts Debian's ``docker-registry`` (CNCF Distribution 2.8, htpasswd auth) on
a free loopback port, with the helper the tests use (``tests/_oci_server.py``),
and builds the fake Llama-shaped checkpoint of ``bench_push_pull.py``. Then,
median of --repeats, each step on a registry with empty storage where it
matters (the registry shares blobs across repositories, so a floor upload
would otherwise make our push a no-op):

- floor, push: for each file, ``POST /blobs/uploads/`` then one monolithic
  ``PUT ?digest=`` streaming the file (requests, in a child Python process,
  so that it is timed from spawn to exit as the CLI is);
- ``adapterhub push REF oci://HOST/ns/bench/ckpt:1 --json`` through the real CLI (HEAD
  per blob, PATCH chunks for big files, config, manifest, tags);
- ``adapterhub push`` again: the count of blobs uploaded must be 0;
- floor, pull: for each blob, one ``GET`` written to a file and fsynced
  (requests, in a child process; no hashing);
- ``adapterhub pull oci://HOST/ns/bench/ckpt:1 --json`` into a fresh home (streams,
  hashes every byte, fsyncs, imports by hard link).

Goal: push and pull at most 1.3x their floor; re-push uploads no blob.

    python bench/bench_remote.py --size-gb 1 --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from _common import (
    cli_argv,
    gib,
    load,
    machine_line,
    median,
    mib,
    print_table,
    run_child,
    sync,
    verdict,
)
from bench_push_pull import files_of, make_checkpoint, prime

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import _oci_server

GOAL = 1.3
NAME = "bench/ckpt"


def digest_of(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb", buffering=0) as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def floor_put(host: str, repo: str, files: list[tuple[Path, str]]) -> None:
    import requests

    s = requests.Session()
    s.auth = (_oci_server.USER, _oci_server.PASSWORD)
    for p, d in files:
        r = s.post(f"http://{host}/v2/{repo}/blobs/uploads/")
        assert r.status_code == 202, r.text
        loc = r.headers["Location"]
        with open(p, "rb") as fh:
            r = s.put(loc + ("&" if "?" in loc else "?") + f"digest={d}", data=fh,
                      headers={"Content-Type": "application/octet-stream", "Content-Length": str(p.stat().st_size)})
        assert r.status_code == 201, r.text


def floor_get(host: str, repo: str, files: list[tuple[Path, str]], dst: Path) -> None:
    import requests

    s = requests.Session()
    s.auth = (_oci_server.USER, _oci_server.PASSWORD)
    dst.mkdir()
    for p, d in files:
        with s.get(f"http://{host}/v2/{repo}/blobs/{d}", stream=True) as r:
            assert r.status_code == 200, r.text
            with open(dst / p.name, "wb", buffering=0) as out:
                out.writelines(r.iter_content(4 << 20))
                os.fsync(out.fileno())


def floor_child(kind: str, host: str, repo: str, files: list[tuple[Path, str]], dst: Path | None = None) -> list[str]:
    """argv running a floor in a child process, so it is timed as the CLI is (start-up included)."""
    argv = [sys.executable, __file__, f"--floor-{kind}", host, repo, str(dst or "-")]
    return argv + [f"{p}={d}" for p, d in files]


def run_floor(argv: list[str]) -> None:
    kind, host, repo, dst, *pairs = argv
    files = [(Path(a), d) for a, _, d in (x.rpartition("=") for x in pairs)]
    if kind == "--floor-put":
        floor_put(host, repo, files)
    else:
        floor_get(host, repo, files, Path(dst))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("--floor-"):
        return run_floor(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="fixture size in GiB (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="median over this many runs (default 3)")
    ap.add_argument("--tmp", default="/tmp", help="where to put the temp data (default /tmp)")
    args = ap.parse_args()
    reason = _oci_server.available()
    if reason:
        sys.exit(f"cannot start a registry: {reason}")

    cli = cli_argv()
    with tempfile.TemporaryDirectory(prefix="adapterhub-bench-remote-", dir=args.tmp) as tmp_:
        tmp = Path(tmp_)
        src = tmp / "src"
        size = make_checkpoint(src, int(args.size_gb * 2**30))
        files = [(p, digest_of(p)) for p in files_of(src)]
        print(f"adapterhub OCI remote benchmark ({machine_line()})")
        print(f"fixture: {len(files)} files, {gib(size)}; registry: {_oci_server.BINARY} on loopback, htpasswd auth")
        print(f"CLI: {' '.join(cli)}; sync and a priming write before every writing step\n")
        local = tmp / "local"
        env_local = {**os.environ, "ADAPTERHUB_HOME": str(local)}
        run_child(cli + ["push", str(src), NAME], env_local)

        wall: dict[str, list[float]] = defaultdict(list)
        cpu: dict[str, list[float]] = defaultdict(list)
        rss: dict[str, list[int]] = defaultdict(list)
        repush_uploads: list[int] = []

        for r in range(args.repeats):
            server = _oci_server.start(tmp / f"registry{r}a")
            try:
                prime(tmp, size)
                run = run_child(floor_child("put", server.host, "floor/ckpt", files))
                wall["floor: monolithic PUT"].append(run.seconds)
                cpu["floor: monolithic PUT"].append(run.cpu_seconds)
                rss["floor: monolithic PUT"].append(run.maxrss_bytes)
                sync()
            finally:
                server.stop()
                shutil.rmtree(tmp / f"registry{r}a")

            server = _oci_server.start(tmp / f"registry{r}b")
            try:
                env_creds = {"ADAPTERHUB_REMOTE_USERNAME": _oci_server.USER, "ADAPTERHUB_REMOTE_PASSWORD": _oci_server.PASSWORD}
                target = f"oci://{server.host}/ns/bench/ckpt:1"

                prime(tmp, size)
                run = run_child(cli + ["push", f"{NAME}:1", target, "--json"], {**env_local, **env_creds})
                res = json.loads(run.stdout)
                assert res["blobs_uploaded"] == len(files) + 1, res
                for k, v in (("wall", run.seconds), ("cpu", run.cpu_seconds)):
                    (wall if k == "wall" else cpu)["adapterhub push"].append(v)
                rss["adapterhub push"].append(run.maxrss_bytes)
                sync()

                run = run_child(cli + ["push", f"{NAME}:1", target, "--json"], {**env_local, **env_creds})
                repush_uploads.append(json.loads(run.stdout)["blobs_uploaded"])
                wall["adapterhub push (again)"].append(run.seconds)
                cpu["adapterhub push (again)"].append(run.cpu_seconds)
                rss["adapterhub push (again)"].append(run.maxrss_bytes)

                dst = tmp / "floor-get"
                prime(tmp, size)
                run = run_child(floor_child("get", server.host, "ns/bench/ckpt", files, dst))
                wall["floor: GET + fsync"].append(run.seconds)
                cpu["floor: GET + fsync"].append(run.cpu_seconds)
                rss["floor: GET + fsync"].append(run.maxrss_bytes)
                shutil.rmtree(dst)
                sync()

                home2 = tmp / "home2"
                prime(tmp, size)
                run = run_child(cli + ["pull", target, "--json"], {**os.environ, "ADAPTERHUB_HOME": str(home2), **env_creds})
                got = json.loads(run.stdout)
                assert got["size"] == size and got["blobs_downloaded"] == len(files), got
                wall["adapterhub pull"].append(run.seconds)
                cpu["adapterhub pull"].append(run.cpu_seconds)
                rss["adapterhub pull"].append(run.maxrss_bytes)
                shutil.rmtree(home2)
                sync()
            finally:
                server.stop()
                shutil.rmtree(tmp / f"registry{r}b")
            print(f"  repeat {r + 1}/{args.repeats} done ({load()})", flush=True)

    med = {k: median(v) for k, v in wall.items()}
    print(f"\nmedian of {args.repeats} ({gib(size)}); CPU = user+sys of the step's process:")
    print_table(
        ["step", "wall s", "GiB/s", "CPU s", "peak RSS", "all runs (wall s)"],
        [(k, f"{m:.3f}", f"{size / 2**30 / m:.2f}", f"{median(cpu[k]):.2f}", mib(max(rss[k])) if k in rss else "-",
          " ".join(f"{t:.2f}" for t in wall[k])) for k, m in med.items()],
    )
    push_r = med["adapterhub push"] / med["floor: monolithic PUT"]
    pull_r = med["adapterhub pull"] / med["floor: GET + fsync"]
    print(f"\nratios (goal: <= {GOAL}x the raw HTTP floor):")
    print(f"  push / monolithic PUT = {push_r:5.2f}   {verdict(push_r <= GOAL)}")
    print(f"  pull / GET + fsync    = {pull_r:5.2f}   {verdict(pull_r <= GOAL)}")
    print(f"re-push blobs uploaded (goal 0; max over repeats): {max(repush_uploads)}   {verdict(max(repush_uploads) == 0)}")
    print("peak RSS of the adapterhub child (max over repeats):")
    for k in ("adapterhub push", "adapterhub push (again)", "adapterhub pull"):
        print(f"  {k:<24} {mib(max(rss[k]))}")
    print(f"{load()} at the end")


if __name__ == "__main__":
    main()
