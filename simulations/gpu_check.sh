#!/usr/bin/env bash
# GPU check (issue 19): a short federated causal-LM run on the CPU, then on CUDA in bf16
# and in 4-bit (QLoRA), printing tokens/s and peak GPU memory side by side. Exits non-zero
# when the GPU was not used (no CUDA device, or a run that stayed on the CPU).
#
#   simulations/gpu_check.sh                      # on a GPU machine, as is
#   simulations/gpu_check.sh --cpu-only --model tiny-llama   # the CPU part only (exit 0)
#
# Needs: the README's install; for 4-bit also  pip install "fedpeft[gpu]"  (bitsandbytes).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export HF_HUB_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python}" "$here/gpu_check.py" "$@"
