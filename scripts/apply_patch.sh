#!/usr/bin/env bash
# Add --pipeline-offload to the pretrain_gpt.py of a Megatron-LM fork, as source (for people
# who keep a fork; everyone else runs `python -m megatron_offload.launch pretrain_gpt.py ...`).
#   bash scripts/apply_patch.sh /path/to/Megatron-LM [--check]
# Reads the release from megatron/core/package_info.py of that checkout, picks
# patches/megatron-lm-core_r0.<minor>.patch (0.16 to 0.19), checks that it applies cleanly,
# then applies it (--check: only check). Already patched: says so and changes nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "apply_patch.sh: error: $*" >&2; exit 2; }

[ $# -ge 1 ] || die "usage: bash scripts/apply_patch.sh /path/to/Megatron-LM [--check]"
MLM="$1"; CHECK="${2:-}"
[ -z "$CHECK" ] || [ "$CHECK" = "--check" ] || die "unknown option $CHECK (only --check)"
INFO="$MLM/megatron/core/package_info.py"
TARGET="$MLM/pretrain_gpt.py"
[ -f "$INFO" ] || die "$INFO not found: give the root of a Megatron-LM checkout"
[ -f "$TARGET" ] || die "$TARGET not found: give the root of a Megatron-LM checkout"

MAJOR="$(sed -n 's/^MAJOR *= *\([0-9]*\).*/\1/p' "$INFO")"
MINOR="$(sed -n 's/^MINOR *= *\([0-9]*\).*/\1/p' "$INFO")"
PATCH_LEVEL="$(sed -n 's/^PATCH *= *\([0-9A-Za-z]*\).*/\1/p' "$INFO")"
RELEASE="$MAJOR.$MINOR.$PATCH_LEVEL"
PATCH="$ROOT/patches/megatron-lm-core_r$MAJOR.$MINOR.patch"
if [ ! -f "$PATCH" ]; then
  SUPPORTED="$(cd "$ROOT/patches" && ls megatron-lm-core_r*.patch | sed 's/megatron-lm-core_r\(.*\)\.patch/\1/' | paste -sd, - | sed 's/,/, /g')"
  die "Megatron-LM $RELEASE has no patch here (releases: $SUPPORTED); use the launcher instead: python -m megatron_offload.launch pretrain_gpt.py ... --pipeline-offload"
fi
if grep -q "megatron_offload" "$TARGET"; then
  echo "apply_patch.sh: $TARGET already has --pipeline-offload (megatron_offload); nothing to do"
  exit 0
fi
if ! patch --dry-run --forward --silent -p1 -d "$MLM" < "$PATCH" >/dev/null; then
  die "$(basename "$PATCH") does not apply to $TARGET (Megatron-LM $RELEASE, edited locally?); nothing was changed. Apply it by hand or use the launcher: python -m megatron_offload.launch pretrain_gpt.py ... --pipeline-offload"
fi
if [ "$CHECK" = "--check" ]; then
  echo "apply_patch.sh: $(basename "$PATCH") applies cleanly to Megatron-LM $RELEASE"
  exit 0
fi
patch --forward --silent -p1 -d "$MLM" < "$PATCH"
echo "apply_patch.sh: patched $TARGET for Megatron-LM $RELEASE: run it with --pipeline-offload [--offload-policy ...]"
