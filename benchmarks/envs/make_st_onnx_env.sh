#!/usr/bin/env bash
# The environment for sentence-transformers' ONNX backend (its dynamic int8 export) in benchmarks/cpu_variants.py:
# it needs optimum-onnx, which the project does not depend on and whose optimum pin conflicts with optimum-intel's.
#
# usage: benchmarks/envs/make_st_onnx_env.sh   (from an activated project venv)
exec "$(dirname "$0")/make_peer_env.sh" st-onnx optimum.onnxruntime optimum-onnx
