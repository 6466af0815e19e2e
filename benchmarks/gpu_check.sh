#!/usr/bin/env bash
# The GPU check (one CUDA GPU, <= 8 min): sftlab vs TRL on Qwen2.5-0.5B- and Llama-3.2-1B-shaped models, and
# packed rows with flash-attention 2 (or SDPA). Prints one JSON line; see benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 benchmarks/gpu_check.py "$@"
