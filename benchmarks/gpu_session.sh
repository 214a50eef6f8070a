#!/usr/bin/env bash
# Every pending GPU measurement in ONE device call (the device tool lends ~15 minutes a session, start included).
# On the CPU machine first: `bash ../shared/gpu/fetch-wheels.sh` (wheels into .whl/, git-ignored), then run this
# with carry=[".whl"] and timeout_s ~580. Results land in $OUT (or ./gpu_out); copy them into BENCHMARKS.md.
# Parts run most-valuable first, each under its own limit and all under one deadline (BUDGET seconds, default
# 540), so a slow part cannot starve the rest and whatever finished comes back:
#   1. benchmarks/step_cost.py          issue 13: the ViT-B/16 step table (f = 0.8), MFU, sampler timings; packed
#      transformer calls vs one call per group side by side (uniform+multires, all savings). The jest and
#      jest+flexi rows were measured on 2026-11-26 (BENCHMARKS.md) and are left out to fit the budget.
#   2. benchmarks/step_cost.py          issue 13: text tower by bucket plan, packed and per bucket (sets
#      text_bucket_overhead)
#   3. benchmarks/step_cost.py          issue 13: jest_select eager vs compile_selection={'mode': 'reduce-overhead'}
#      (one CUDA graph) at N = 1,280 and 8,192; picks checked against eager
#   4. benchmarks/global_selection.py   issue 12: one rank at N = 32,768 (target < 62 ms, warm), no host sync
#   5. benchmarks/step_cost.py --compile  issue 13: Composer's compile_config on uniform and all-savings rows
#   6. benchmarks/gpu_check.py          issue 11: the checks not yet run on a GPU (2026-11-26 ran FSDP1/2 bf16,
#      flexi, cached, resume and the ViT-B/16 recipe: all PASS; see BENCHMARKS.md)
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
start=$SECONDS
deadline=$((start + ${BUDGET:-540}))
# part LIMIT NAME CMD...: run CMD under min(LIMIT, time left), output to $out/NAME.txt
part() {
  local limit=$1 name=$2; shift 2
  local left=$((deadline - SECONDS))
  (( left < 20 )) && { echo "SKIPPED $name (${left}s left)" | tee -a "$out/skipped.txt"; return; }
  (( limit > left )) && limit=$left
  echo "== $name (limit ${limit}s, t=$((SECONDS - start))s)"
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "== $name rc=$? after $((SECONDS - start))s" | tee -a "$out/$name.txt"
  tail -n 40 "$out/$name.txt"
}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; git rev-parse --short HEAD 2>/dev/null; \
  date -u; python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; nproc; } \
  | tee "$out/machine.txt"
vit=(--device cuda --model jest-vit-b-16 --precision amp_bf16)
part 190 step_cost python3 benchmarks/step_cost.py "${vit[@]}" --batch-size 256 --filter-ratios 0.8 --steps 6 \
  --warmup 2 --repeats 2 --only uniform,uniform+multires,jest+flexi+cached,jest+flexi+cached+multires
part 60 text_tower_1280 python3 benchmarks/step_cost.py "${vit[@]}" --text-tower-only 1280 --sampler-reps 5
part 90 selection_compiled python3 benchmarks/step_cost.py "${vit[@]}" --batch-size 256 --filter-ratios 0.8 \
  --steps 1 --warmup 1 --repeats 1 --only uniform --no-extra-rows --sampler-sizes 1280,8192 --compile-selection
part 60 global_selection_cuda python3 benchmarks/global_selection.py --device cuda --ranks 1 --n-local 32768 \
  --b-local 6554 --modes blockwise --sync-debug
part 200 step_cost_compile python3 benchmarks/step_cost.py "${vit[@]}" --batch-size 256 --filter-ratios 0.8 \
  --steps 6 --warmup 3 --repeats 1 --sampler-sizes '' --only uniform,jest+flexi+cached+multires --compile \
  --no-extra-rows
part 200 gpu_check python3 benchmarks/gpu_check.py --workdir /tmp/gpu-check --timeout 120 \
  --only recipe:quickstart_reference --only recipe:quickstart --only recipe:jest --only recipe:uniform \
  --only recipe:reference
exit 0
