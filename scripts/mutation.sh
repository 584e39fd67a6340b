#!/usr/bin/env bash
# Mutation testing of the code the guarantees rest on (issue 16), outside CI.
#
#   bash scripts/mutation.sh [GROUP...]     GROUP: trust digest merge fsck (default: all four)
#   bash scripts/mutation.sh recheck GROUP [TEST...]
#
# recheck: after tests were added, apply each mutant that survived GROUP's last
# run to a fresh copy of $REV and run TEST... (default: the group's tests)
# with -x against it; prints "killed" or "SURVIVED" per mutant. Quicker than a
# new run: no stats pass, and only the mutants that survived.
#
# mutmut (3.x; installed into .venv by this script, not part of the test
# extra) mutates the functions listed per group below, and runs only the
# tests named for that group against each mutant. It works on a private copy
# of the committed tree (git archive of $REV, default HEAD) in $WORK (default
# /tmp/adapterhub-mutation), never in the work tree: mutants are never written
# where anyone else runs tests. The copy is laid out as an ordinary src/
# package (registry/ and converters/ become src/adapterhub/{registry,converters},
# as the installed package has them), and PYTHONPATH points at mutmut's mutated
# copy, so the CLI subprocesses some tests start run the mutant too.
# OMP_NUM_THREADS=1: mutmut forks each mutant's run from a process that has
# run torch; an OpenMP thread pool does not survive a fork (the merge group's
# children hung until their timeout without it).
#
# Results: docs/reliability.md, "Mutation testing". Each group prints its
# counts and the surviving mutants; `cd $WORK/GROUP && mutmut show NAME` shows one.
set -euo pipefail -f  # -f: the mutant-name globs below are for mutmut, not the shell
cd "$(dirname "$0")/.."
REPO=$PWD
PY=$REPO/.venv/bin/python
WORK=${WORK:-/tmp/adapterhub-mutation}
REV=${REV:-HEAD}
MUTMUT_VERSION=${MUTMUT_VERSION:-3.8.1}
CHILDREN=${CHILDREN:-2}

"$PY" -m pip show mutmut >/dev/null 2>&1 || "$PY" -m pip install -q "mutmut==$MUTMUT_VERSION"
MUTMUT=$REPO/.venv/bin/mutmut

# group -> files to mutate | mutant-name globs (the functions) | tests | lines left alone (regexes)
declare -A FILES GLOBS TESTS SKIP
FILES[trust]="src/adapterhub/trust/policy.py src/adapterhub/trust/provenance.py"
GLOBS[trust]="adapterhub.trust.policy.xǁTrustedKeyǁproblem__mutmut_* adapterhub.trust.policy.x_namespace_of__mutmut_* adapterhub.trust.policy.x_check_namespace__mutmut_* adapterhub.trust.policy.x_required__mutmut_* adapterhub.trust.provenance.x__scope_names__mutmut_* adapterhub.trust.provenance.x__trusted_pem__mutmut_*"
TESTS[trust]="tests/test_trust_scope.py tests/test_trust_policy.py tests/test_signing.py"
FILES[digest]="src/adapterhub/manifest.py"
GLOBS[digest]="adapterhub.manifest.xǁManifestǁdigest__mutmut_* adapterhub.manifest.x_hash_file__mutmut_* adapterhub.manifest.x_hash_file_sized__mutmut_* adapterhub.manifest.x_sort_key__mutmut_* adapterhub.manifest.xǁManifestǁfrom_entries__mutmut_*"
TESTS[digest]="tests/test_manifest.py"
FILES[merge]="src/adapterhub/converters/formats/peft_deltas.py src/adapterhub/converters/formats/peft_plan.py"
# _lora_ops: only its mutants 1-31 (mutmut 3.8.1 numbering), those of the lines that look up r
# and alpha and compute the scale; the rest of it builds ModuleOps and shape errors.
P=adapterhub.converters.formats
GLOBS[merge]="$P.peft_deltas.x_lora_delta__mutmut_* $P.peft_deltas.x__lora_delta_into__mutmut_* $P.peft_deltas.x__T__mutmut_* $P.peft_deltas.x__inplace_lora__mutmut_* $P.peft_deltas.x__apply_lora__mutmut_* $P.peft_plan.x__rank_alpha__mutmut_* $P.peft_plan.x__lora_ops__mutmut_[1-9] $P.peft_plan.x__lora_ops__mutmut_[12][0-9] $P.peft_plan.x__lora_ops__mutmut_3[01]"
# The LoRA/DoRA tests of the PEFT-equivalence suite (its other methods do not reach these functions);
# error-message lines of _lora_ops are not merge maths (tests/test_merge.py checks those).
m=tests/test_merge_equivalence.py
TESTS[merge]="$m::test_lora_all_linear $m::test_lora_scale_with_alpha_not_a_multiple_of_r $m::test_rslora_with_rank_and_alpha_patterns $m::test_dora_linear_and_embedding $m::test_embedding_lora $m::test_fan_in_fan_out_gpt2_conv1d $m::test_blocked_path_on_matrices_taller_than_a_block"
SKIP[merge]='InvalidArtifactError\( ^\s+f"'
FILES[fsck]="src/adapterhub/registry/maintenance.py"
GLOBS[fsck]="adapterhub.registry.maintenance.x_fsck__mutmut_* adapterhub.registry.maintenance.x__rehash__mutmut_*"
# The fsck tests of both files (not the slow kill -9 of a merge, which only needs fsck to list a dir).
f=tests/test_rm_gc_fsck.py
TESTS[fsck]="$f::test_rm_all_and_gc $f::test_gc_removes_orphans_and_temp_files $f::test_gc_removes_work_dirs_of_killed_hub_imports $f::test_fsck_lists_every_problem $f::test_fsck_rehashes_a_same_size_change $f::test_a_file_that_grows_while_pushed_is_recorded_with_the_bytes_hashed $f::test_fsck_compares_every_blob_size_with_every_file_row $f::test_every_staging_area_in_the_home_is_reported_and_collected tests/test_reliability.py::test_fsck_and_gc_plans_run_while_gc_deletes"

toml_list() { printf '['; local sep=""; for x in "$@"; do printf "%s'%s'" "$sep" "$x"; sep=", "; done; printf ']'; }

run_group() {
    local g=$1 dir=$WORK/$1
    fresh_copy "$dir"
    mkdir -p "$dir/mutants/src"  # on sys.path from the start (PYTHONPATH below)
    # shellcheck disable=SC2086
    cat >"$dir/pyproject.toml" <<EOF
[tool.mutmut]
source_paths = ["src"]
only_mutate = $(toml_list ${FILES[$g]})
pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]
pytest_add_cli_args_test_selection = $(toml_list ${TESTS[$g]})
do_not_mutate_patterns = $(toml_list ${SKIP[$g]:-})
use_git_change_detection = false

[tool.pytest.ini_options]
markers = ["slow: end-to-end", "gpu: needs CUDA"]
filterwarnings = ["ignore::UserWarning:peft", "ignore::FutureWarning:transformers", "ignore::UserWarning:transformers"]
EOF
    echo "== $g: mutating ${FILES[$g]}; tests ${TESTS[$g]}"
    local start=$SECONDS
    # shellcheck disable=SC2086
    (cd "$dir" && PYTHONPATH="$dir/mutants/src" ADAPTERHUB_IO_THREADS=1 OMP_NUM_THREADS=1 "$MUTMUT" run --max-children "$CHILDREN" ${GLOBS[$g]}) \
        | tail -n 5
    echo "== $g: $((SECONDS - start)) s"
    # shellcheck disable=SC2086
    (cd "$dir" && "$MUTMUT" results --all true 2>/dev/null) | in_scope summary ${GLOBS[$g]}
}

# in_scope MODE GLOB...: filter `mutmut results --all true` to the mutants the globs name;
# MODE summary prints the counts and the survivors, MODE survivors their names only
# (with those no selected test reached).
in_scope() {
    "$PY" -c '
import collections, fnmatch, sys
mode, globs = sys.argv[1], sys.argv[2:]
rows = [line.strip().rsplit(": ", 1) for line in sys.stdin if ": " in line]
rows = [(n, s) for n, s in rows if any(fnmatch.fnmatchcase(n, g) for g in globs)]
if mode == "summary":
    print("   ", dict(collections.Counter(s for _, s in rows)))
for n, s in rows:
    if s in ("survived", "no tests"):  # no tests: no selected test reached the function
        print(("  " + n + ": " + s) if mode == "summary" else n)
' "$@"
}

fresh_copy() {  # fresh_copy DIR: $REV as an ordinary src/ package in DIR
    rm -rf "$1"
    mkdir -p "$1/src"
    git -C "$REPO" archive "$REV" adapterhub registry converters tests | tar -x -C "$1"
    mv "$1/adapterhub" "$1/src/adapterhub"
    mv "$1/registry" "$1/src/adapterhub/registry"
    mv "$1/converters" "$1/src/adapterhub/converters"
}

recheck() {
    local g=$1 dir=$WORK/$1 fresh=$WORK/$1-recheck
    shift
    local tests=("$@")
    # shellcheck disable=SC2206
    [ ${#tests[@]} -gt 0 ] || tests=(${TESTS[$g]})
    [ -d "$dir/mutants" ] || { echo "no earlier run in $dir" >&2; exit 2; }
    fresh_copy "$fresh"
    local survivors
    # shellcheck disable=SC2086
    survivors=$(cd "$dir" && "$MUTMUT" results --all true 2>/dev/null | in_scope survivors ${GLOBS[$g]})
    for m in $survivors; do
        for f in ${FILES[$g]}; do cp "$fresh/$f" "$dir/$f"; done  # the run's own copy, unmutated
        (cd "$dir" && "$MUTMUT" apply "$m" >/dev/null)
        for f in ${FILES[$g]}; do cp "$dir/$f" "$fresh/$f.mutant"; done
        for f in ${FILES[$g]}; do mv "$fresh/$f" "$fresh/$f.orig"; mv "$fresh/$f.mutant" "$fresh/$f"; done
        if (cd "$fresh" && PYTHONPATH="$fresh/src" ADAPTERHUB_IO_THREADS=1 OMP_NUM_THREADS=1 "$PY" -m pytest -x -q -p no:cacheprovider \
                "${tests[@]}" >/dev/null 2>&1); then
            echo "  $m: SURVIVED"
        else
            echo "  $m: killed"
        fi
        for f in ${FILES[$g]}; do mv "$fresh/$f.orig" "$fresh/$f"; cp "$fresh/$f" "$dir/$f"; done
    done
}

if [ "${1:-}" = recheck ]; then
    shift
    [ -n "${FILES[${1:-}]:-}" ] || { echo "usage: $0 recheck GROUP [TEST...]" >&2; exit 2; }
    recheck "$@"
    exit 0
fi

groups=("$@")
[ ${#groups[@]} -gt 0 ] || groups=(trust digest merge fsck)
for g in "${groups[@]}"; do
    [ -n "${FILES[$g]:-}" ] || { echo "unknown group $g (trust digest merge fsck)" >&2; exit 2; }
    run_group "$g"
done
