#!/usr/bin/env bash
# Run one benchmark command against an earlier revision and the working tree, alternating, in one script:
#
#   benchmarks/compare_revisions.sh REV ROUNDS -- COMMAND...
#
# COMMAND runs ROUNDS times in each tree (REV first, then the working tree, then again), with the project's
# virtual environment and PYTHONPATH pointing at that tree, so `python -m leapdecode.cli bench ...` or
# `python benchmarks/decode_speed.py ...` exercise that tree's code. `{out}` in COMMAND becomes a results
# folder per tree and round (bench_results/compare/<tree>-<round>). Both trees read the working tree's
# bundled data when the command names it. The earlier revision is checked out in a temporary worktree,
# removed at the end.
set -euo pipefail
[ "$#" -ge 4 ] && [ "$3" = "--" ] || { echo "usage: $0 REV ROUNDS -- COMMAND..." >&2; exit 2; }
rev=$1 rounds=$2
shift 3
root=$(git rev-parse --show-toplevel)
py="$root/.venv/bin/python"
base=$(mktemp -d)
trap 'git -C "$root" worktree remove --force "$base" >/dev/null 2>&1 || true' EXIT
git -C "$root" worktree add --detach "$base" "$rev" >/dev/null
mkdir -p "$root/bench_results/compare"
for round in $(seq 1 "$rounds"); do
  for tree in base new; do
    dir=$([ "$tree" = base ] && echo "$base" || echo "$root")
    out="$root/bench_results/compare/$tree-$round"
    echo "== $tree ($([ "$tree" = base ] && echo "$rev" || echo "working tree")), round $round"
    (cd "$dir" && PYTHONPATH="$dir" "$py" "${@//\{out\}/$out}")
  done
done
