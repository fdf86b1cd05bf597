#!/usr/bin/env bash
# A venv for one of benchmarks/cpu_variants.py's peers whose packages conflict with the project's venv.
#
# It reads the project venv's packages through a .pth file (appended after its own site-packages) and adds
# only the peer's own packages.
#
# usage: benchmarks/envs/make_peer_env.sh NAME MODULE PACKAGE...   (from an activated project venv)
set -euo pipefail
name="$1" module="$2"
shift 2
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/$name"
python3 -m venv "$venv"
site="$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
python -c 'import sys; print("\n".join(p for p in sys.path if p.endswith("site-packages")))' > "$site/zz_project_venv.pth"
# bgert itself, when it is installed editable in the project venv (its finder runs after the line above)
python -c 'import glob, site, sys; [print(open(p).read().strip()) for d in sys.path if d.endswith("site-packages") for p in glob.glob(d + "/__editable__.bgert-*.pth")]' > "$site/zzz_bgert_editable.pth"
"$venv/bin/pip" install -q "$@"
"$venv/bin/python" -c "import $module, bgert; print('$name env ready:', $module.__name__)"
