#!/usr/bin/env bash
# The environment for sentence-transformers' OpenVINO backend in benchmarks/cpu_variants.py.
#
# optimum-intel needs optimum >= 2.3 while our optimum-onnx pins optimum ~= 2.1, so it cannot go into the
# project's venv. This venv reads the project venv's packages through a .pth file (appended after its own
# site-packages) and adds only what optimum-intel brings: optimum, optimum-intel, openvino-tokenizers.
#
# usage: benchmarks/envs/make_st_openvino_env.sh   (from an activated project venv)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/st-openvino"
python3 -m venv "$venv"
site="$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
python -c 'import sys; print("\n".join(p for p in sys.path if p.endswith("site-packages")))' > "$site/zz_project_venv.pth"
# bgert itself, when it is installed editable in the project venv (its finder runs after the line above)
python -c 'import glob, site, sys; [print(open(p).read().strip()) for d in sys.path if d.endswith("site-packages") for p in glob.glob(d + "/__editable__.bgert-*.pth")]' > "$site/zzz_bgert_editable.pth"
"$venv/bin/pip" install -q "optimum-intel[openvino]"
"$venv/bin/python" -c 'import optimum.intel, bgert; print("st-openvino env ready:", optimum.intel.__name__)'
