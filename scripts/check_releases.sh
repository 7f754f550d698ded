#!/usr/bin/env bash
# Local check of the launcher on the megatron-core release lines CI does not run (CI: 0.19.x,
# and 0.16.1 without megatron/training). For each release: megatron-core installed without
# dependencies into a private folder that shadows the venv's copy (torch etc. are reused),
# then `megatron-offload train` on 2 gloo ranks, PP=2 x VPP=2: offload none vs full, bitwise.
#   bash scripts/check_releases.sh [RELEASE ...]      (default: 0.17.1 0.18.2 0.19.2)
#   MEGATRON_OFFLOAD_VENV   the Python 3.12 venv to use (default: <repo>/.venv)
#   MEGATRON_LM_GIT         optional: a Megatron-LM clone; then also each release branch's own,
#                           unmodified pretrain_gpt.py through the launcher, and the patches/
#                           diff applied to it (all in a temp folder; nothing fetched is kept)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${MEGATRON_OFFLOAD_VENV:-$ROOT/.venv}/bin/python"
WORK="$(mktemp -d)"; trap 'rm -rf "$WORK"' EXIT
SMALL=(--nproc 2 --pipeline-model-parallel-size 2 --num-layers 4 --hidden-size 64
       --seq-length 32 --max-position-embeddings 32 --vocab-size 128 --train-iters 3)
TINY=(--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32
      --max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 16 --train-iters 3
      --lr 1e-3 --mock-data --tokenizer-type NullTokenizer --vocab-size 128
      --transformer-impl local --use-cpu-initialization --distributed-backend gloo
      --no-gradient-accumulation-fusion --no-bias-gelu-fusion --no-bias-dropout-fusion
      --no-masked-softmax-fusion --no-persist-layer-norm --no-rope-fusion --log-interval 1
      --eval-iters 0 --eval-interval 1000 --num-workers 0 --attention-dropout 0
      --hidden-dropout 0 --pipeline-model-parallel-size 2 --num-virtual-stages-per-pipeline-rank 2)
status=0
for release in "${@:-0.17.1 0.18.2 0.19.2}"; do
  for r in $release; do
    lib="$WORK/mcore-$r"
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$lib" \
      "megatron-core==$r" 2>&1 | grep -v "^WARNING: Location" >&2 || true
    if PYTHONPATH="$lib:$ROOT" "$PY" -m megatron_offload.cli train "${SMALL[@]}" \
        --pipeline-offload --log-dir "$WORK/logs-$r" > "$WORK/out-$r" 2>&1 \
        && grep -q "bitwise identical to --offload-policy none: yes" "$WORK/out-$r"; then
      echo "megatron-core $r: pretrain() through the launcher, none vs full bitwise: ok"
    else
      echo "megatron-core $r: FAILED"; tail -20 "$WORK/out-$r"; status=1
    fi
    if [ -n "${MEGATRON_LM_GIT:-}" ]; then
      minor="$(echo "$r" | cut -d. -f2)"; tree="$WORK/Megatron-LM-$r"; mkdir -p "$tree"
      git --git-dir "$MEGATRON_LM_GIT" archive "core_r0.$minor.0" | tar -x -C "$tree"
      cp "$lib"/megatron/core/datasets/helpers_cpp*.so "$tree/megatron/core/datasets/"
      if (cd "$tree" && PYTHONPATH="$ROOT" "$PY" -m torch.distributed.run --nproc-per-node 2 \
            --master-port 29$((RANDOM % 900 + 100)) -m megatron_offload.launch pretrain_gpt.py \
            "${TINY[@]}" --pipeline-offload > "$WORK/real-$r" 2>&1) \
         && bash "$ROOT/scripts/apply_patch.sh" "$tree" > /dev/null; then
        echo "Megatron-LM core_r0.$minor.0 pretrain_gpt.py, unmodified, through the launcher; patch applies: ok"
      else
        echo "Megatron-LM core_r0.$minor.0: FAILED"; tail -20 "$WORK/real-$r"; status=1
      fi
    fi
  done
done
exit $status
