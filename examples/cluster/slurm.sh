#!/bin/bash
# A sharded tensormerge merge on Slurm: a job array of N workers, each
# writing its share of the output shards, then one `join` that checks the
# pieces and assembles the model. See README.md next to this file.
#
# Submit from a login node (the script submits itself twice):
#     ./slurm.sh CONFIG.yml /shared/merged 8 [extra merge flags, e.g. --out-shard-size 2GB]
#
# CONFIG, every model it names and OUT's parent must be on a file system
# that every node sees at the same path (or models are hub ids already in a
# shared, pre-filled hub cache: HF_HOME on the shared file system).
#
# Resources per worker: the merge streams tensor by tensor, so memory is
# bounded by the largest tensors and `--max-memory` (256 MiB by default),
# not by the model. Adjust the #SBATCH lines to your cluster.
#SBATCH --job-name=tensormerge
#SBATCH --cpus-per-task=8
#SBATCH --mem=4G
#SBATCH --time=04:00:00
#SBATCH --output=tensormerge-%A_%a.log
set -euo pipefail

TENSORMERGE=${TENSORMERGE:-tensormerge}
# No downloads on the compute nodes: inputs come from the shared cache.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    # On the login node: submit the array and the join that waits for it.
    if [[ $# -lt 3 ]]; then
        echo "usage: $0 CONFIG OUT N [merge flags...]" >&2
        exit 2
    fi
    config=$(realpath "$1"); out=$(realpath -m "$2"); n=$3; shift 3
    # Check the config and inputs once, before any node starts.
    "$TENSORMERGE" merge "$config" -o "$out" --dry-run --shard "0/$n" "$@" > /dev/null
    array=$(sbatch --parsable --array="0-$((n - 1))" "$0" worker "$config" "$out" "$n" "$@")
    join=$(sbatch --parsable --dependency="afterok:$array" --job-name=tensormerge-join \
        --cpus-per-task=1 --mem=1G --output="tensormerge-join-%j.log" \
        "$0" join "$out")
    echo "workers: job $array (array 0-$((n - 1))), join: job $join"
    exit 0
fi

case "$1" in
worker)
    config=$2; out=$3; n=$4; shift 4
    # SLURM_ARRAY_TASK_ID runs 0..N-1, as --shard counts.
    exec "$TENSORMERGE" --no-progress merge "$config" -o "$out" \
        --shard "$SLURM_ARRAY_TASK_ID/$n" -j "${SLURM_CPUS_PER_TASK:-1}" "$@"
    ;;
join)
    # Checks sizes and SHA-256 of every piece; exit 1 and nothing written
    # when a piece is missing, doubled, corrupt or from another plan.
    exec "$TENSORMERGE" --no-progress join "$2"
    ;;
*)
    echo "unknown step $1" >&2
    exit 2
    ;;
esac
