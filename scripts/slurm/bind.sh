#!/usr/bin/env bash
# Per-GPU CPU/NUMA affinity for one rank: `bind.sh CMD ...` runs CMD under
#   numactl --cpunodebind=N --membind=N   with N = local rank / (ranks per NUMA node)
# when BIND_NUMA=1 and numactl is installed; otherwise it runs CMD unchanged.
# The local rank is LOCAL_RANK (torchrun) or SLURM_LOCALID (srun, one task per GPU); the
# ranks per node are LOCAL_WORLD_SIZE, SLURM_NTASKS_PER_NODE or GPUS_PER_NODE.
# On DGX-class nodes (8 GPUs, 2 sockets) GPUs 0-3 sit on NUMA node 0 and 4-7 on node 1; check
# `nvidia-smi topo -m` and set NUMA_NODES if the layout differs.
set -euo pipefail
if [[ "${BIND_NUMA:-0}" == 1 ]] && command -v numactl >/dev/null 2>&1; then
  local_rank="${LOCAL_RANK:-${SLURM_LOCALID:-0}}"
  per_node="${LOCAL_WORLD_SIZE:-${SLURM_NTASKS_PER_NODE:-${GPUS_PER_NODE:-1}}}"
  per_node="${per_node%%(*}"; per_node="${per_node%%,*}"
  numa_nodes="${NUMA_NODES:-$(ls -d /sys/devices/system/node/node[0-9]* 2>/dev/null | wc -l)}"
  (( numa_nodes >= 1 )) || numa_nodes=1
  per_numa=$(( (per_node + numa_nodes - 1) / numa_nodes ))
  (( per_numa >= 1 )) || per_numa=1
  node=$(( local_rank / per_numa ))
  exec numactl --cpunodebind="$node" --membind="$node" "$@"
fi
exec "$@"
