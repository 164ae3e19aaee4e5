#!/usr/bin/env bash
# Submits a recipe to Slurm as N shards per job, stage by stage:
#
#   scripts/slurm/submit.sh RECIPE N
#
# For each job of the recipe (filter, inpaint, guide, in that order) an array
# of N tasks (array.sbatch: `orchestrate run RECIPE --shard auto --job JOB`),
# then a merge (merge.sbatch) that starts when every task succeeded
# (--dependency=afterok:<array job id>); the next job's array waits for that
# merge, since a later job reads an earlier one's merged output (inpaint.input:
# filter). A failed task cancels everything after it (--kill-on-invalid-dep);
# resubmitting resumes every shard where it stopped.
#
# Prints `stage JOB array ARRAY_ID merge MERGE_ID` per job (`stage JOB task ID`
# for finetune and evaluate, which run as one task), then `last MERGE_ID`
# (wait for that one, or chain yours with --dependency=afterok:MERGE_ID).
#
# Environment:
#   ORCHESTRATE  the orchestrate binary the nodes run (default: orchestrate on PATH,
#                else this checkout's target/release/orchestrate)
#   OUTPUT       outputs under this folder instead of the recipe's `output`
#   JOBS         the jobs to submit (default: all of the recipe's, from `run RECIPE --list-jobs`)
#   SBATCH_ARGS  extra sbatch options for every job, e.g. "--partition=gpu --account=me"
#   ARRAY_ARGS   extra sbatch options for the array tasks, e.g. "--gres=gpu:1 --cpus-per-task=8 --mem=32G"
#   MERGE_ARGS   extra sbatch options for the merges, e.g. "--partition=cpu"
#   AFTER        a job id the first array waits for (afterok)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
die() { echo "submit: $*" >&2; exit 1; }
usage="usage: scripts/slurm/submit.sh RECIPE N"
recipe="${1:?$usage}"
shards="${2:?$usage}"
[[ "$shards" =~ ^[1-9][0-9]*$ ]] || die "N: \`$shards\` is not a whole number >= 1; $usage"
[[ -f "$recipe" ]] || die "$recipe: no such recipe file"
recipe="$(realpath "$recipe")"
command -v sbatch >/dev/null || die "sbatch is not on PATH (is this a Slurm login node?)"

bin="${ORCHESTRATE:-$(command -v orchestrate || true)}"
if [[ -z "$bin" && -x "$here/../../target/release/orchestrate" ]]; then
    bin="$here/../../target/release/orchestrate"
fi
[[ -n "$bin" && -x "$bin" ]] || die "no orchestrate binary: set ORCHESTRATE to its path (one every node can run)"
export ORCHESTRATE="$(realpath "$bin")"
if [[ -n "${OUTPUT:-}" ]]; then
    export OUTPUT="$(realpath -m "$OUTPUT")"
fi

jobs="${JOBS:-$("$ORCHESTRATE" run "$recipe" --list-jobs)}"
[[ -n "$jobs" ]] || die "$recipe: no jobs to submit"
# shellcheck disable=SC2206 # word splitting of the *_ARGS lists is intended
extra=(${SBATCH_ARGS:-})
# shellcheck disable=SC2206
array_extra=(${ARRAY_ARGS:-})
# shellcheck disable=SC2206
merge_extra=(${MERGE_ARGS:-})
prev="${AFTER:-}"
for job in $jobs; do
    dep=()
    if [[ -n "$prev" ]]; then dep=(--dependency="afterok:$prev"); fi
    case "$job" in
    finetune | evaluate)
        # One process (LoRA training, and the before/after comparison): a
        # one-task array, nothing to merge.
        single="$(sbatch --parsable --kill-on-invalid-dep=yes "${dep[@]}" --array=0-0 \
            --job-name="orchestrate-$job" "${extra[@]}" "${array_extra[@]}" \
            "$here/array.sbatch" "$recipe" "$job")"
        single="${single%%;*}"
        echo "stage $job task $single"
        prev="$single"
        continue
        ;;
    esac
    array="$(sbatch --parsable --kill-on-invalid-dep=yes "${dep[@]}" --array="0-$((shards - 1))" \
        --job-name="orchestrate-$job" "${extra[@]}" "${array_extra[@]}" \
        "$here/array.sbatch" "$recipe" "$job")"
    array="${array%%;*}"
    merge="$(sbatch --parsable --kill-on-invalid-dep=yes --dependency="afterok:$array" \
        --job-name="orchestrate-merge-$job" "${extra[@]}" "${merge_extra[@]}" \
        "$here/merge.sbatch" "$recipe" "$shards" "$job")"
    merge="${merge%%;*}"
    echo "stage $job array $array merge $merge"
    prev="$merge"
done
echo "last $prev"
