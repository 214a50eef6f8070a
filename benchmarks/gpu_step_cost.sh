#!/usr/bin/env bash
# Issue 13's GPU measurements, prepared for one device call each (run from the repo root on the GPU machine).
# Before: `bash ../shared/gpu/fetch-wheels.sh` on the CPU machine (wheels into .whl/, git-ignored: carry it).
#   bash benchmarks/gpu_step_cost.sh steps      # ~4-5 min on an H100: the step table (f = 0.8), fused vs Composer AdamW
#   bash benchmarks/gpu_step_cost.sh text       # ~1 min: the text scoring forward by bucket plan (sets the overhead)
#   bash benchmarks/gpu_step_cost.sh compile    # ~4-6 min: torch.compile (Composer compile_config) and compiled scoring
# Output goes to $OUT (the device tool's folder) or ./gpu_out.
set -euo pipefail
what=${1:-steps}
out=${OUT:-gpu_out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$out/gpu.txt" || true
common=(--device cuda --model jest-vit-b-16 --precision amp_bf16)
case "$what" in
  steps)
    timeout 540 python3 benchmarks/step_cost.py "${common[@]}" --batch-size 256 --filter-ratios 0.8 --steps 6 \
      --warmup 2 --repeats 2 --sampler-sizes '' | tee "$out/step_cost.txt" ;;
  text)
    for n in 256 1280; do
      timeout 120 python3 benchmarks/step_cost.py "${common[@]}" --text-tower-only "$n" --sampler-reps 5 \
        | tee "$out/text_tower_$n.txt"
    done ;;
  compile)
    timeout 540 python3 benchmarks/step_cost.py "${common[@]}" --batch-size 256 --filter-ratios 0.8 --steps 6 \
      --warmup 3 --repeats 1 --sampler-sizes '' --only uniform,jest+flexi+cached+multires --compile \
      | tee "$out/step_cost_compile.txt" ;;
  *) echo "usage: $0 steps|text|compile" >&2; exit 2 ;;
esac
