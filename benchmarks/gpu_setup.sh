# Sourced by run_gpu.sh and check_decode_gpu.sh: their shared settings (LAYERS, PRESET, WORKDIR, PYTHON), then it
# moves to the repository root, makes $OUT, and puts the repository and the wheels in .whl/
# (../shared/tools/device-wheels.sh puts bitsandbytes there; the GPU machine lacks it) on PYTHONPATH.
set -uo pipefail
: "${OUT:?set OUT to the folder for the results}"
LAYERS=${LAYERS:-32}
PRESET=${PRESET:-llama-2-7b}
WORKDIR=${WORKDIR:-/tmp/qlora_bench}
PYTHON=${PYTHON:-python3}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
