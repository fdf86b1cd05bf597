#!/usr/bin/env bash
# Create the separate environment for bge-reranker-v2.5-gemma2-lightweight.
#
# FlagEmbedding 1.4.2's LightWeightFlagLLMReranker (its bundled CostWiseGemma code) runs only under
# transformers <= 4.47 (it calls Gemma2DecoderLayer the pre-4.48 way), and the model exports only
# with the TorchScript exporter there. This venv is used to export the lightweight reranker
# (`bgert export ... --kind lightweight_reranker`) and to make tests/data/lightweight_* with
# tests/make_lightweight_reference.py. The main venv keeps transformers 4.57.
#
# usage: benchmarks/envs/make_lightweight_env.sh [VENV_DIR]   (default: ~/.cache/bgert/venv-lightweight)
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${1:-${HOME}/.cache/bgert/venv-lightweight}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/pip" install -q --upgrade pip
# torch only from the project's constraints (CPU build, same version as the main venv)
"$venv/bin/pip" install -q -c "$here/constraints.txt" torch
"$venv/bin/pip" install -q "transformers==4.46.*" "flagembedding==1.4.2" onnx onnxruntime "numpy<3" safetensors pytest
"$venv/bin/pip" install -q --no-deps -e "$here"
"$venv/bin/python" - <<'PY'
import torch, transformers, FlagEmbedding, onnxruntime
from importlib.metadata import version
print("lightweight env ready: torch", torch.__version__, "| transformers", transformers.__version__,
      "| flagembedding", version("flagembedding"), "| onnxruntime", onnxruntime.__version__)
PY
