#!/usr/bin/env bash
# Run a command on the GPU machine with fla-core (and einops) from the carried wheels in .whl/.
#
#   bash scripts/gpu_run.sh python -m pytest -q tests/gpu
#
# The device machine has torch, triton and transformers but no internet: fetch the wheels here first,
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl fla-core==0.6.0 einops
# and carry .whl with the call. They install into /tmp/site, which goes first on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$@"
