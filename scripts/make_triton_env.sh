#!/usr/bin/env bash
# Make the server-side Python environment for the tritonserver bundled in nvidia-pytriton:
#   numpy<2, onnxruntime, tokenizers   (what bgert's python-backend models import), and
#   nvidia-pytriton installed with --no-deps (only its tritonserver binary and python backend are used;
#   its own dependencies would pin numpy<2 into the client environment).
# The 2.51 python backend crashes on string inputs when the stub's environment has numpy 2, hence the
# separate environment. Usage: scripts/make_triton_env.sh [DIR]
#   DIR defaults to $BGERT_TRITON_ENV, else ~/.cache/bgert/triton-env (where bgert looks for it).
# Idempotent: a finished environment (stamp file matching these requirements) is left as it is.
set -euo pipefail
DIR="${1:-${BGERT_TRITON_ENV:-$HOME/.cache/bgert/triton-env}}"
PY="${PYTHON:-python3}"
REQS=("numpy>=1.24,<2" "onnxruntime>=1.17" "tokenizers>=0.15")
SERVER="nvidia-pytriton==0.7.0"
STAMP="$DIR/.bgert-triton-env"
WANT="${REQS[*]} $SERVER $("$PY" -c 'import sys; print("py%d.%d" % sys.version_info[:2])')"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  echo "triton env ready: $DIR"; exit 0
fi
rm -rf "$DIR"
"$PY" -m venv "$DIR"
"$DIR/bin/python" -m pip install -q --disable-pip-version-check "${REQS[@]}"
"$DIR/bin/python" -m pip install -q --disable-pip-version-check --no-deps "$SERVER"
"$DIR/bin/python" - <<'EOF'
import glob, os, subprocess, sys, sysconfig
import numpy, onnxruntime, tokenizers  # noqa: F401  (the models' imports; pytriton itself is not imported)
root = os.path.join(sysconfig.get_paths()["purelib"], "pytriton")
stub = os.path.join(root, "tritonserver", "python_backend_stubs", "%d.%d" % sys.version_info[:2],
                    "triton_python_backend_stub")
if not os.path.isfile(stub):
    sys.exit(f"nvidia-pytriton has no python backend stub for Python {sys.version_info[0]}.{sys.version_info[1]}; "
             "rerun with PYTHON=python3.X (3.8-3.13)")
libs = glob.glob(os.path.join(os.path.dirname(root), "nvidia_pytriton.libs"))
env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(libs))
missing = [l for l in subprocess.run(["ldd", stub], capture_output=True, text=True, env=env).stdout.splitlines()
           if "not found" in l]
if missing:
    sys.exit("the python backend stub misses shared libraries (install the matching libpython3.X package):\n"
             + "\n".join(missing))
EOF
echo "$WANT" > "$STAMP"
echo "triton env ready: $DIR"
