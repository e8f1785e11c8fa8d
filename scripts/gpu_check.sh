#!/usr/bin/env bash
# The one prepared GPU check: the CUDA tests, then the compare.py runs behind the guide's CUDA tables.
# Run on a CUDA machine from the repository root; results land in $OUT (default: results/gpu).
#
# Budget: at most 9 minutes on one H100/H200 (machine start-up not counted): BUDGET_S below. Every
# step has its own time limit, cut further so that the whole script ends within the budget, and
# each step's log and per-engine JSON join one archive as soon as it ends, so a step stopped by its
# limit keeps the engines it finished. $OUT receives 3 files: env.txt, steps.txt (one line per step:
# exit status and seconds) and gpu_results.tar.gz (logs, results.json, per-engine JSON, charts; a
# plain gpu_results.tar when the script itself was cut off before its end).
# The steps come in priority order and the budget cuts the tail: what is skipped says so in
# steps.txt. ONLY="name1 name2" runs just those steps (a later lease picks up the rest).
# Exit status of a compare.py step: 0 all measured, 1 an engine failed, 3 an engine timed out or
# was refused for memory (its row is missing); 124 the step hit its time limit.
set -u
OUT=$(realpath -m "${OUT:-results/gpu}")
mkdir -p "$OUT" /tmp/gpu
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then   # wheels carried to a machine without a package index
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
BUDGET_S=${BUDGET_S:-540}   # 9 minutes
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    python3 -c "import importlib.util as u; print('flash_attn installed:', u.find_spec('flash_attn') is not None)"
} 2>&1 | tee /tmp/gpu/env.txt
cp /tmp/gpu/env.txt "$OUT/env.txt"
: > "$OUT/steps.txt"

run() {  # run LIMIT_SECONDS NAME COMMAND...   (LIMIT is cut to what the budget has left)
    local limit=$1 name=$2; shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    local left=$((BUDGET_S - SECONDS))
    (( limit > left )) && limit=$left
    if (( limit < 20 )); then
        echo "=== $name: skipped, ${left}s left of the ${BUDGET_S}s budget" | tee -a "$OUT/steps.txt"
        return
    fi
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" > "/tmp/gpu/$name.log" 2>&1
    local status=$?
    echo "$name: exit $status after $((SECONDS - start))s (limit ${limit}s)" | tee -a "$OUT/steps.txt"
    grep -v "it/s\]$" "/tmp/gpu/$name.log" | tail -30
    # every engine's own JSON and the charts too: a step cut off by its time limit keeps the engines it finished
    (cd /tmp/gpu && tar rf "$OUT/gpu_results.tar" "$name.log" $(ls "$name"/*.json "$name"/*.png 2>/dev/null))
}

# Engines run one after another; --timeout stops one engine, the step's limit the whole step.
# 1. Correctness first: every CUDA test (kernels, graphs, pool sizing, reproducibility).
run 90 pytest python3 -m pytest -q -m cuda -p no:cacheprovider tests/
# 2. Our kernels alone (chapters 6 and 7): decode attention bandwidth, int8 matmul against bf16.
run 60 bench_kernels python3 scripts/bench_kernels.py --out /tmp/gpu/bench_kernels/kernels.json
# 3. The default comparison: all seven cycles and both HF baselines (estimate ~3 min: python -m common.benchmark.estimate).
run 270 throughput python3 compare.py --device cuda --cycles 1-7 --plot --timeout 90 --out /tmp/gpu/throughput
# 4. Cycle 8 against 7 on nano-vllm's benchmark (chapter 10's target), then its decode step profiled.
run 150 nano_c78 python3 compare.py --device cuda --workload nano_vllm_bench --cycles 7,8 --no-hf --timeout 70 --out /tmp/gpu/nano_c78
run 60 bench_step python3 scripts/bench_step.py --device cuda --profile /tmp/gpu/bench_step
# ---- the budget usually ends above; ONLY="..." runs the rest in a later lease ----
run 45 shared_prefix python3 compare.py --device cuda --workload shared_prefix --cycles 4,5 --no-hf --timeout 40 --out /tmp/gpu/shared_prefix
run 75 long_context python3 compare.py --device cuda --workload long_context --cycles 5-7 --no-hf --timeout 60 --out /tmp/gpu/long_context
run 150 nano_fp python3 compare.py --device cuda --workload nano_vllm_bench --cycles 7,8 --no-hf --option quantization=None --timeout 70 --out /tmp/gpu/nano_fp
run 300 nano_vllm_bench python3 compare.py --device cuda --workload nano_vllm_bench --cycles 4-6 --no-hf --timeout 90 --out /tmp/gpu/nano_vllm_bench
run 150 online python3 compare.py --device cuda --workload online --cycles 3,4 --timeout 70 --out /tmp/gpu/online
run 150 serve_online bash -c 'python3 -m cycle8_graphs.serve Qwen/Qwen3-0.6B --device cuda --port 8123 & s=$!; python3 -m common.benchmark.http_bench wait http://127.0.0.1:8123 90 && python3 compare.py --device cuda --workload online --base-url http://127.0.0.1:8123/v1 --model Qwen/Qwen3-0.6B --out /tmp/gpu/serve_online; kill $s'

echo "=== done after ${SECONDS}s of the ${BUDGET_S}s budget" | tee -a "$OUT/steps.txt"
gzip -f "$OUT/gpu_results.tar"   # the JSON holds every token id: compressed it stays far below 16 MiB
