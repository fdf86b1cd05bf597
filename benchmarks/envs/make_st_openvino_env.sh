#!/usr/bin/env bash
# The environment for sentence-transformers' OpenVINO backend in benchmarks/cpu_variants.py: optimum-intel needs
# optimum >= 2.3, which the project's venv does not pin.
#
# usage: benchmarks/envs/make_st_openvino_env.sh   (from an activated project venv)
exec "$(dirname "$0")/make_peer_env.sh" st-openvino optimum.intel "optimum-intel[openvino]"
