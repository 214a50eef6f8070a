#!/usr/bin/env bash
# Every pending GPU measurement in ONE device call (the device tool lends ~15 minutes a session, start included).
# On the CPU machine first: `bash ../shared/gpu/fetch-wheels.sh` (wheels into .whl/, git-ignored), then run this
# with carry=[".whl"] and timeout_s ~580. Results land in $OUT (or ./gpu_out); copy them into BENCHMARKS.md.
#   1. benchmarks/gpu_check.py          issue 11: every GPU path, PASS/FAIL lines (+ the ViT-B/16 step-cost table)
#   2. benchmarks/global_selection.py   issue 12: one rank at N = 32,768 (target < 62 ms), no host sync in the sampler
#   3. benchmarks/step_cost.py          issue 13: text tower by bucket plan (sets text_bucket_overhead)
# Each part has its own time limit so that a slow part cannot starve the rest.
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; git rev-parse --short HEAD 2>/dev/null; \
  date -u; python3 -c 'import torch; print("torch", torch.__version__)'; } | tee "$out/machine.txt"
timeout 330 python3 benchmarks/gpu_check.py --workdir /tmp/gpu-check --timeout 200 2>&1 | tee "$out/gpu_check.txt"
timeout 90 python3 benchmarks/global_selection.py --device cuda --ranks 1 --n-local 32768 --b-local 6554 \
  --modes blockwise --sync-debug 2>&1 | tee "$out/global_selection_cuda.txt"
timeout 90 python3 benchmarks/step_cost.py --device cuda --model jest-vit-b-16 --precision amp_bf16 \
  --text-tower-only 1280 --sampler-reps 5 2>&1 | tee "$out/text_tower_1280.txt"
exit 0
