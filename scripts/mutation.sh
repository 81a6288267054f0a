#!/usr/bin/env bash
# Mutation testing of the core modules with mutmut 3.8.1 (.venv/bin/pip install mutmut==3.8.1).
#
#   scripts/mutation.sh [--tree DIR] [--jobs N] [MODULE ...]
#
# MODULE is one of model, augment, module, config (default: all four). Each module is mutated on its
# own, against the fast test file that owns it (the table below): mutmut runs, for each mutant, only
# the tests of that file that call the mutated function, and stops at the first failure.
# It works in a copy of DIR's working tree (default: this checkout; its tracked files and the
# untracked ones git does not ignore) under DIR/.mutation/MODULE, so the tool's files (its
# setup.cfg, mutants/) stay out of the checkout. DIR may be a `git worktree` of an older commit.
#
# Prints, per module and overall, killed/total: a timeout (the mutant made the tests run on and on)
# counts as killed; "survived" and "no tests" (no selected test calls the function) do not. The
# mutants not killed are listed; see one with `cd DIR/.mutation/MODULE && $REPO/.venv/bin/mutmut show NAME`.
# Some of them are equivalent (no test can tell them from the original): judge them there.
set -euo pipefail

declare -A SOURCE=(
    [model]=vitlab/model.py
    [augment]=vitlab/data/augment.py
    [module]=vitlab/training/module.py
    [config]=vitlab/config.py
)
declare -A TESTS=(
    [model]=tests/test_model.py
    [augment]="tests/test_augment.py tests/test_data.py"
    [module]=tests/test_training.py
    [config]=tests/test_training.py
)

repo=$(cd "$(dirname "$0")/.." && pwd)
tree=$repo
jobs=2
while [[ $# -gt 0 ]]; do
    case $1 in
        --tree) tree=$(cd "$2" && pwd); shift 2 ;;
        --jobs) jobs=$2; shift 2 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
done
modules=("$@")
[[ ${#modules[@]} -gt 0 ]] || modules=(model augment module config)
for m in "${modules[@]}"; do
    [[ -n ${SOURCE[$m]:-} ]] || { echo "unknown module '$m' (known: ${!SOURCE[*]})" >&2; exit 2; }
done

mutmut=$repo/.venv/bin/mutmut
version=$("$repo/.venv/bin/python" -c "import importlib.metadata as m; print(m.version('mutmut'))" 2>/dev/null || true)
[[ $version == 3.8.1 ]] || { echo "needs mutmut 3.8.1: $repo/.venv/bin/pip install mutmut==3.8.1" >&2; exit 2; }
# One thread per mutant process: --jobs processes share the CPU, and a forked child never meets a
# thread pool its parent started.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""

total_killed=0 total_all=0
summary=()
for m in "${modules[@]}"; do
    work=$tree/.mutation/$m
    rm -rf "$work" && mkdir -p "$work"
    git -C "$tree" ls-files -z --cached --others --exclude-standard -- vitlab tests pyproject.toml \
        | (cd "$tree" && tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -xf - -C "$work"
    cat > "$work/setup.cfg" <<EOF
[mutmut]
source_paths = vitlab
only_mutate = ${SOURCE[$m]}
pytest_add_cli_args_test_selection =$(printf '\n    %s' ${TESTS[$m]})
pytest_add_cli_args = -p no:cacheprovider
EOF
    echo "== $m: ${SOURCE[$m]} against ${TESTS[$m]}"
    start=$SECONDS
    (cd "$work" && "$mutmut" run --max-children "$jobs" > run.log 2>&1) || { tail -40 "$work/run.log"; exit 1; }
    (cd "$work" && "$mutmut" results --all true) > "$work/results.txt"
    killed=$(grep -cE ': (killed|timeout)$' "$work/results.txt" || true)
    all=$(grep -c ': ' "$work/results.txt" || true)
    grep -vE ': (killed|timeout)$' "$work/results.txt" || true
    summary+=("$(printf '%-8s %-28s %4d/%-4d killed (%d%%)  %ds' "$m" "${SOURCE[$m]}" "$killed" "$all" \
        "$(( all ? 100 * killed / all : 0 ))" $(( SECONDS - start )))")
    total_killed=$(( total_killed + killed )) total_all=$(( total_all + all ))
done
printf '%s\n' "${summary[@]}"
echo "overall: $total_killed/$total_all killed ($(( total_all ? 100 * total_killed / total_all : 0 ))%)"
