"""The registry's reliability claims, checked with real processes.

"Every write is a temp file plus fsync plus atomic rename, and the index is
updated only after the blobs are durable. A ``kill -9`` at any moment during
push leaves a registry that ``fsck`` finds clean, and the same push then
succeeds. Eight processes pushing to the same name at once all get distinct
versions, and none is lost. A full disk fails cleanly, with nothing
half-registered."

Killed and concurrent operations run as real ``python -m adapterhub.cli``
processes. Kill points come from a sweep of delays over a measured run, plus
points found by watching the store from outside (a temp file appears, the
n-th blob is renamed into place); nothing in adapterhub is hooked. The checks
after each kill run the same CLI in-process, which is faster and equivalent.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from ._crash import (
    TMP_SUFFIX,
    MountRefused,
    artifact_digest,
    blob_dir,
    file_hashes,
    fill,
    make_adapter,
    resize_tmpfs,
    seed_garbage,
    signal_after,
    signal_when,
    spawn,
    stored,
    sweep,
    tmpfs,
)
from .conftest import run_cli

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="kill -9, flock and tmpfs behaviour is checked on Linux")

_runner = CliRunner()


def ah(*args: object, home: Path | None = None):
    """The CLI in-process (the autouse fixture's home unless ``home`` is given)."""
    from adapterhub.cli import cli

    env = {"ADAPTERHUB_HOME": str(home)} if home is not None else None
    return _runner.invoke(cli, [str(a) for a in args], env=env)


def fsck_clean(home: Path | None = None) -> dict:
    """``fsck --json`` exits 0 with no problems; leftovers are only reported as reclaimable."""
    r = ah("fsck", "--json", home=home)
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["ok"] is True and rep["problems"] == [], rep["problems"]
    return rep


def versions_of(name: str, home: Path | None = None) -> list[dict]:
    """``ls NAME --json``; an unknown name (exit 3) is an empty list."""
    r = ah("ls", name, "--json", home=home)
    if r.exit_code == 3:
        return []
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def pull_matches(ref: str, dest: Path, expected: dict[str, str], home: Path | None = None) -> None:
    r = ah("pull", ref, dest, home=home)
    assert r.exit_code == 0, r.output
    assert file_hashes(dest) == expected
    shutil.rmtree(dest)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# -- kill -9 ------------------------------------------------------------------------------

PUSH_SIZES = {"weights_mb": 2, "extra_mb": (2, 2)}  # five files, 6 MB


@pytest.mark.slow
def test_kill_9_at_many_points_during_push(tmp_path, home):
    # One complete push, timed end to end (start-up included), sets the sweep.
    warm = make_adapter(tmp_path / "src-warm", seed=10_000, **PUSH_SIZES)
    t0 = time.monotonic()
    _, out, err = signal_after(spawn("push", warm, "crash/warm", "--json"), 3600)
    duration = time.monotonic() - t0
    assert json.loads(out)["version"] == "1", err

    # Files are stored in digest order: README.md, adapter_config.json,
    # adapter_model.safetensors, extras/state-0.bin, extras/state-1.bin.
    points: list[tuple[str, object]] = [(f"t={d:.3f}s", d) for d in sweep(duration, 8)]
    points += [(f"temp of {f} appears", f) for f in ("adapter_model.safetensors", "extras/state-1.bin")]
    points += [(f"{n} blobs stored", n) for n in (4, 5)]

    outcomes: Counter[str] = Counter()
    names = ["crash/warm"]
    for i, (label, when) in enumerate(points):
        src = make_adapter(tmp_path / f"src{i}", seed=i, **PUSH_SIZES)
        expected, digest = file_hashes(src), artifact_digest(src)
        shas = set(expected.values())
        name = f"crash/k{i}"
        names.append(name)
        proc = spawn("push", src, name, "--json")
        if isinstance(when, float):
            signal_after(proc, when)
        elif isinstance(when, str):
            signal_when(proc, lambda one={expected[when]}: bool(stored(home, one)[1]))
        else:
            signal_when(proc, lambda n=when: len(stored(home, shas)[0]) >= n)

        blobs, temps = stored(home, shas)
        found = versions_of(name)
        if found:
            assert [v["digest"] for v in found] == [digest], f"{label}: a version with other content"
            outcome = "done"
        else:
            outcome = "writing a blob" if temps else "blobs stored, not indexed" if blobs else "before any write"
        outcomes[outcome] += 1

        rep = fsck_clean()
        if temps:  # in a digest's prefix dir, or in sha256/tmp/ (one-pass copies)
            assert {Path(p).name for p in rep["temp_files"]} >= temps
        if outcome == "blobs stored, not indexed":
            assert blobs <= set(rep["unreferenced_blobs"])

        # The same push now succeeds, and pull gives back the same bytes.
        r = ah("push", src, name, "--json")
        assert r.exit_code == 0, f"{label}: {r.output}"
        res = json.loads(r.stdout)
        assert (res["version"], res["digest"]) == ("1", digest)
        assert res["created"] is (outcome != "done")
        pull_matches(name, tmp_path / "pulled", expected)
        shutil.rmtree(src)

    mid = outcomes["writing a blob"] + outcomes["blobs stored, not indexed"]
    print(f"\nkill -9 during push: {len(points)} kill points, {mid} mid-push: {dict(outcomes)}")
    assert outcomes["writing a blob"] >= 1 and mid >= 3, dict(outcomes)

    # gc (a real process) reclaims every leftover; nothing indexed is touched.
    gc = run_cli("gc", "--yes", "--json")
    assert gc.returncode == 0, gc.stderr
    rep = fsck_clean()
    assert rep["unreferenced_blobs"] == [] and rep["temp_files"] == []
    assert rep["blobs_checked"] == 5 * len(names)
    assert sorted(v["name"] for v in json.loads(ah("ls", "--json").stdout)) == sorted(names)


def test_kill_9_while_a_fresh_registry_is_created(tmp_path):
    """Killed while creating index.db and running the first migration."""
    src = make_adapter(tmp_path / "src", seed=1, weights_mb=1, extra_mb=(1,))
    expected, digest = file_hashes(src), artifact_digest(src)
    for i, watch in enumerate(("index.db", "index.db-wal", "index.db.migrate.lock")):
        h = tmp_path / f"fresh{i}" / "adapterhub"
        sent, _, _ = signal_when(spawn("push", src, "qa", home=h), lambda: (h / watch).exists())
        assert sent, f"the push finished before {watch} appeared"
        fsck_clean(h)
        assert [v["digest"] for v in versions_of("qa", home=h)] in ([], [digest])
        r = ah("push", src, "qa", "--json", home=h)
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["version"] == "1"
        pull_matches("qa", tmp_path / "pulled", expected, home=h)


@pytest.mark.slow
def test_kill_9_during_pull_leaves_dest_absent_or_complete(tmp_path, home):
    src = make_adapter(tmp_path / "src", seed=3, weights_mb=4, extra_mb=(4, 4, 4))
    assert ah("push", src, "big").exit_code == 0
    expected = file_hashes(src)
    parent = tmp_path / "pulls"
    parent.mkdir()

    t0 = time.monotonic()
    _, _, err = signal_after(spawn("pull", "big", parent / "dest-00"), 3600)
    duration = time.monotonic() - t0
    assert file_hashes(parent / "dest-00") == expected, err

    def staging(dest: Path) -> list[Path]:
        return list(parent.glob(f".{dest.name}.*{TMP_SUFFIX}"))

    def staged_files(dest: Path) -> int:
        return sum(1 for d in staging(dest) for p in d.rglob("*") if p.is_file() and not p.name.endswith(TMP_SUFFIX))

    points: list[tuple[str, object]] = [(f"t={d:.3f}s", d) for d in sweep(duration, 8)]
    points += [("staging dir appears", 0), ("1 file staged", 1), ("4 files staged", 4)]
    mid = 0
    for i, (label, when) in enumerate(points, start=1):
        dest = parent / f"dest-{i:02d}"
        proc = spawn("pull", "big", dest)
        if isinstance(when, float):
            signal_after(proc, when)
        elif when == 0:
            signal_when(proc, lambda: bool(staging(dest)))
        else:
            signal_when(proc, lambda n=when: staged_files(dest) >= n)
        if dest.exists():
            assert file_hashes(dest) == expected, f"{label}: {dest} is partial"
        else:
            mid += bool(staging(dest))
            pull_matches("big", dest, expected)
        # Nothing else appeared beside DEST: only the hidden, marked staging dir.
        assert {p.name for p in parent.iterdir() if dest.name in p.name} <= {dest.name} | {
            p.name for p in staging(dest)
        }
    print(f"\nkill -9 during pull: {len(points)} kill points, {mid} left a staging dir and no DEST")
    assert mid >= 2
    rep = fsck_clean()
    assert rep["temp_files"] == [] and rep["unreferenced_blobs"] == []


@pytest.mark.slow
def test_kill_9_during_gc(tmp_path, home):
    kept = {}
    for seed in (1, 2):
        src = make_adapter(tmp_path / f"src{seed}", seed=seed, weights_mb=0.5, extra_mb=(0.5,))
        assert ah("push", src, f"keep{seed}").exit_code == 0
        kept[f"keep{seed}"] = file_hashes(src)

    # One complete gc of the same amount of garbage, timed, sets the sweep.
    seed_garbage(home, n_blobs=150, n_temps=10)
    t0 = time.monotonic()
    _, _, err = signal_after(spawn("gc", "--yes", stdout=subprocess.DEVNULL), 3600)
    duration = time.monotonic() - t0
    assert stored(home)[1] == set(), err

    points: list[tuple[str, object]] = [(f"t={d:.3f}s", d) for d in sweep(duration, 5)[1:]]
    points += [("temp files gone", "temps")] + [("first garbage blob gone", "blobs")] * 2
    garbage: set[str] = set()
    mid = 0
    for label, when in points:
        garbage |= seed_garbage(home, n_blobs=150, n_temps=10)
        before_blobs, before_temps = stored(home)
        before = len(before_blobs & garbage) + len(before_temps)
        proc = spawn("gc", "--yes", stdout=subprocess.DEVNULL)
        if isinstance(when, float):
            sent, _, err = signal_after(proc, when)
        elif when == "temps":
            sent, _, err = signal_when(proc, lambda: not stored(home)[1])
        else:
            first = min(garbage & before_blobs)
            sent, _, err = signal_when(proc, lambda: not (blob_dir(home) / first[:2] / first).exists())
        assert sent or proc.returncode == 0, err
        after_blobs, after_temps = stored(home)
        after = len(after_blobs & garbage) + len(after_temps)
        mid += sent and 0 < before - after < before
        rep = fsck_clean()
        assert set(rep["unreferenced_blobs"]) <= garbage  # nothing referenced became garbage
        garbage &= after_blobs

    print(f"\nkill -9 during gc: {len(points)} kill points, {mid} mid-gc (some but not all garbage removed)")
    assert mid >= 2
    assert run_cli("gc", "--yes").returncode == 0
    rep = fsck_clean()
    assert rep["unreferenced_blobs"] == [] and rep["temp_files"] == []
    for name, expected in kept.items():
        pull_matches(name, tmp_path / "pulled", expected)


# -- concurrency -----------------------------------------------------------------------------


@pytest.mark.slow
def test_eight_concurrent_pushers_get_distinct_versions(tmp_path, home):
    srcs = [make_adapter(tmp_path / f"src{i}", seed=100 + i, weights_mb=0.5, extra_mb=(0.5,)) for i in range(8)]
    procs = [spawn("push", s, "team/race", "--json") for s in srcs]  # fresh home: they race to create it too
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    versions = [r["version"] for r in results]
    assert sorted(versions, key=int) == [str(v) for v in range(1, 9)]
    assert all(r["created"] for r in results)
    for src, res in zip(srcs, results):
        assert res["digest"] == artifact_digest(src)
        pull_matches(f"team/race:{res['version']}", tmp_path / "pulled", file_hashes(src))
    listed = versions_of("team/race")
    assert len(listed) == 8
    assert [v["version"] for v in listed if "latest" in v["tags"]] == ["8"]
    fsck_clean()


def test_eight_concurrent_pushers_of_the_same_content_share_one_version(tmp_path, home):
    src = make_adapter(tmp_path / "src", seed=5, weights_mb=0.5, extra_mb=(0.5,))
    procs = [spawn("push", src, "team/same", "--json") for _ in range(8)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    assert {(r["version"], r["digest"]) for r in results} == {("1", artifact_digest(src))}
    assert sum(r["created"] for r in results) == 1
    assert len(versions_of("team/same")) == 1
    rep = fsck_clean()
    assert rep["blobs_checked"] == len(file_hashes(src)) and rep["unreferenced_blobs"] == []
    pull_matches("team/same", tmp_path / "pulled", file_hashes(src))


@pytest.mark.slow
def test_gc_racing_pushes_never_deletes_a_referenced_blob(tmp_path, home):
    """Pushes whose blobs gc sees as garbage (left by an earlier killed push) run
    at the same time as a gc; every finished push stays intact."""
    assert ah("ls").exit_code == 0  # create the registry
    pushed: dict[str, dict[str, str]] = {}
    for rnd in range(2):
        srcs = [make_adapter(tmp_path / f"r{rnd}-{i}", seed=1000 * rnd + i, weights_mb=0.5, extra_mb=(0.5,))
                for i in range(3)]
        for s in srcs:  # what a push killed after its blobs were stored leaves behind
            for rel, sha in file_hashes(s).items():
                p = blob_dir(home) / sha[:2] / sha
                p.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(s / rel, p)
                p.chmod(0o444)
        seed_garbage(home, n_blobs=50, n_temps=5)
        procs = []
        for i, s in enumerate(srcs):
            if i == 1:
                procs.append(("gc", spawn("gc", "--yes", "--json")))
            procs.append((s, spawn("push", s, f"race/{s.name}", "--json")))
        for what, p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, f"{what}: {err}"
            if what != "gc":
                pushed[f"race/{what.name}"] = file_hashes(what)
        fsck_clean()  # a blob deleted under a finished push would be "missing"
    for name, expected in pushed.items():
        pull_matches(name, tmp_path / "pulled", expected)
    assert run_cli("gc", "--yes").returncode == 0
    rep = fsck_clean()
    assert rep["unreferenced_blobs"] == [] and rep["temp_files"] == []


@pytest.mark.slow
def test_fsck_and_gc_plans_run_while_gc_deletes(home):
    """Read-only passes over the store must not trip over blobs a running gc deletes.

    The garbage shares one store directory, so a listing of it is very likely
    to name blobs that gc unlinks before they are stat-ed.
    """
    assert ah("ls").exit_code == 0
    overlapped = 0
    for _ in range(2):
        seed_garbage(home, n_blobs=300, n_temps=0, size=16, prefix="00")
        gc = spawn("gc", "--yes", stdout=subprocess.DEVNULL)
        while gc.poll() is None:
            for args in (("fsck", "--json"), ("gc", "--dry-run", "--json")):
                r = ah(*args)
                assert r.exit_code == 0, r.output
            overlapped += gc.poll() is None
        _, err = gc.communicate()
        assert gc.returncode == 0, err
    assert overlapped >= 3, "the checks never overlapped a running gc"
    rep = fsck_clean()
    assert rep["unreferenced_blobs"] == []


# -- full disk -------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    try:
        with tmpfs(tmp_path / "disk", "4m") as d:
            yield d
    except MountRefused as e:
        pytest.skip(f"needs root to mount a 4 MB tmpfs: {e}")


BIG = {"weights_mb": 1, "extra_mb": (3, 1.5)}  # 5.5 MB: more than the 4 MB disk holds


def test_full_disk_push_fails_cleanly(tmp_path, small_disk):
    h = small_disk / "adapterhub"
    src = make_adapter(tmp_path / "src", seed=7, **BIG)
    r = run_cli("push", src, "big", env={"ADAPTERHUB_HOME": str(h)})
    assert r.returncode == 7, r.stderr
    errors = error_lines(r.stderr)
    assert len(errors) == 1 and "no space left" in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert versions_of("big", home=h) == []
    assert json.loads(ah("ls", "--json", home=h).stdout) == []
    assert not list(small_disk.rglob(f"*{TMP_SUFFIX}"))
    rep = fsck_clean(h)
    assert rep["temp_files"] == []

    # With room, the same push succeeds and gc drops what the failed one stored.
    resize_tmpfs(small_disk, "64m")
    r = run_cli("push", src, "big", "--json", env={"ADAPTERHUB_HOME": str(h)})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["version"] == "1"
    pull_matches("big", tmp_path / "pulled", file_hashes(src), home=h)
    assert ah("gc", "--yes", home=h).exit_code == 0
    rep = fsck_clean(h)
    assert rep["unreferenced_blobs"] == [] and rep["blobs_checked"] == 5


def test_full_disk_while_writing_the_index(tmp_path, small_disk):
    """The disk fills up at every point from the blobs to the index commit."""
    h = small_disk / "adapterhub"
    assert ah("ls", home=h).exit_code == 0
    phases: Counter[str] = Counter()
    for i, slack in enumerate([*range(0, 64 * 1024, 4096), *range(64 * 1024, 320 * 1024, 32 * 1024)]):
        src = make_adapter(tmp_path / f"src{i}", seed=i, weights_mb=0.01, extra_mb=())
        shas = set(file_hashes(src).values())
        filler = fill(small_disk, leave=sum(p.stat().st_size for p in src.iterdir()) + slack)
        try:
            r = ah("push", src, f"n{i}", home=h)
        finally:
            filler.unlink()
        assert r.exit_code in (0, 7), r.output  # never "unexpected error"
        if r.exit_code == 7:
            assert "unexpected" not in r.stderr and len(error_lines(r.stderr)) == 1, r.stderr
            assert versions_of(f"n{i}", home=h) == []
            phases["index" if stored(h, shas)[0] == shas else "blobs"] += 1
        else:
            phases["ok"] += 1
        assert not list(small_disk.rglob(f"*{TMP_SUFFIX}"))
        fsck_clean(h)
    print(f"\nfull disk at {sum(phases.values())} points: {dict(phases)}")
    assert phases["index"] >= 1 and phases["ok"] >= 1, dict(phases)


def test_full_disk_pull_fails_cleanly(tmp_path, home, small_disk):
    src = make_adapter(tmp_path / "src", seed=8, **BIG)
    assert ah("push", src, "big").exit_code == 0
    dest = small_disk / "out"
    r = run_cli("pull", "big", dest)
    assert r.returncode == 7, r.stderr
    errors = error_lines(r.stderr)
    assert len(errors) == 1 and "no space left" in errors[0], r.stderr
    assert not dest.exists() and list(small_disk.iterdir()) == []  # no staging dir left either
    fsck_clean()
    resize_tmpfs(small_disk, "64m")
    r = run_cli("pull", "big", dest)
    assert r.returncode == 0, r.stderr
    assert file_hashes(dest) == file_hashes(src)


# -- Ctrl-C --------------------------------------------------------------------------------


def test_ctrl_c_during_push_exits_130_and_leaves_nothing(tmp_path, home):
    assert ah("ls").exit_code == 0
    triggers = {
        "temp of adapter_model.safetensors appears": lambda e: bool(stored(home, {e["adapter_model.safetensors"]})[1]),
        "3 blobs stored": lambda e: len(stored(home, set(e.values()))[0]) >= 3,
    }
    for i, (label, ready) in enumerate(triggers.items()):
        src = make_adapter(tmp_path / f"src{i}", seed=i, weights_mb=4, extra_mb=(4, 4))
        expected = file_hashes(src)
        shas = set(expected.values())
        proc = spawn("push", src, "qa")
        sent, out, err = signal_when(proc, lambda: ready(expected), signal.SIGINT)
        assert sent, f"{label}: the push finished first"
        assert proc.returncode == 130, f"{label}: {err}"
        assert "interrupted" in err and "Traceback" not in err
        assert stored(home, shas)[1] == set(), f"{label}: temp file left behind"
        assert versions_of("qa") == []
        fsck_clean()
        r = ah("push", src, "qa", "--json")
        assert r.exit_code == 0, r.output
        pull_matches("qa", tmp_path / "pulled", expected)
        assert ah("rm", "qa", "--all", "--yes").exit_code == 0
