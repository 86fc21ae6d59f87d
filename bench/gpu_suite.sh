#!/usr/bin/env bash
# Every GPU benchmark and the GPU correctness pass in one go (8-minute budget); see bench/gpu_suite.py.
#   bench/gpu_suite.sh              # on one H100/H200 -> bench/results/gpu_suite-<card>.json
#   bench/gpu_suite.sh --cpu-tiny   # tiny presets on the CPU, ~1-2 minutes
set -euo pipefail
exec python "$(dirname "$0")/gpu_suite.py" "$@"
