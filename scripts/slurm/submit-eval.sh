#!/usr/bin/env bash
# Submits a sharded `qtaylor eval` to Slurm: a job array of $QTAYLOR_SHARDS tasks
# (eval-array.sbatch, task I runs `eval --shard I/N`), then merge.sbatch with
# --dependency=afterok on the array, so the merge starts only once every shard succeeded.
# Prints the two job ids.
#
# Environment: everything eval-array.sbatch and merge.sbatch read (QTAYLOR_BIN, QTAYLOR_MODEL,
# QTAYLOR_DATA, QTAYLOR_SAMPLERS, QTAYLOR_NFE, QTAYLOR_N, ..., QTAYLOR_PARTS, QTAYLOR_RESULTS:
# sbatch passes the environment on), and
#   QTAYLOR_SHARDS             array tasks (default: 4)
#   QTAYLOR_SBATCH_ARGS        sbatch options for both jobs, e.g. "--partition=cpu --time=2:00:00"
#   QTAYLOR_ARRAY_SBATCH_ARGS  sbatch options for the array only, e.g. "--gres=gpu:1"
#   QTAYLOR_WAIT=1             wait until the merge has finished (sbatch --wait on the merge);
#                              the exit status is then the merge's
# A shard that fails cancels the merge (--kill-on-invalid-dep=yes) instead of leaving it
# pending; resubmitting redoes only the shards whose parts are missing.
# Relative paths are taken from the folder you submit from (the jobs' $SLURM_SUBMIT_DIR):
# submit from the repository root for the default model and classifier.
set -euo pipefail

fail() {
    echo "submit-eval.sh: error: $*" >&2
    exit 2
}
src=${BASH_SOURCE[0]}
[[ $src == */* ]] && here=${src%/*} || here=.
here=$(cd "$here" && pwd)
shards=${QTAYLOR_SHARDS:-4}
[[ $shards =~ ^[0-9]+$ ]] && ((shards >= 1)) || fail "QTAYLOR_SHARDS=$shards: expected a positive integer"
command -v sbatch >/dev/null || fail "sbatch not found: this submits to Slurm (without it, run eval --shard I/N yourself, then qtaylor merge)"
read -r -a both <<<"${QTAYLOR_SBATCH_ARGS:-}"
read -r -a array_only <<<"${QTAYLOR_ARRAY_SBATCH_ARGS:-}"

# --parsable prints "jobid" or "jobid;cluster".
array=$(sbatch --parsable --array="0-$((shards - 1))" ${both[@]+"${both[@]}"} \
    ${array_only[@]+"${array_only[@]}"} "$here/eval-array.sbatch")
array_id=${array%%;*}
[[ $array_id =~ ^[0-9]+$ ]] || fail "sbatch printed '$array' for the array, expected a job id"
wait=()
if [[ ${QTAYLOR_WAIT:-} == 1 ]]; then
    wait=(--wait)
    echo "submitted eval array job $array_id ($shards shards); waiting for the merge" >&2
fi
if ! merge=$(sbatch --parsable --dependency="afterok:$array_id" --kill-on-invalid-dep=yes \
    ${wait[@]+"${wait[@]}"} ${both[@]+"${both[@]}"} "$here/merge.sbatch"); then
    fail "the merge job after array job $array_id failed, or was cancelled because a shard failed (see the jobs' output files)"
fi
merge_id=${merge%%;*}
[[ $merge_id =~ ^[0-9]+$ ]] || fail "sbatch printed '$merge' for the merge, expected a job id"
if ((${#wait[@]})); then
    # sbatch --wait exits 0 for a job cancelled before it ran (a shard failed): ask Slurm.
    state=$(scontrol show job "$merge_id" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | head -n 1 || true)
    if [[ -n $state && $state != JobState=COMPLETED ]]; then
        fail "merge job $merge_id ended with ${state#JobState=}: a shard of array job $array_id failed (see its output files)"
    fi
fi
echo "submitted eval array job $array_id ($shards shards, parts in ${QTAYLOR_PARTS:-qtaylor-parts}) and merge job $merge_id (after the array succeeds; results in ${QTAYLOR_RESULTS:-qtaylor-results})"
