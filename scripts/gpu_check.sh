#!/usr/bin/env bash
# The one prepared GPU check: CUDA tests, then the compare.py runs the guide's CUDA tables come from.
# Run on a CUDA machine from the repository root; results land in $OUT (default: results/gpu).
# Sized for about ten minutes of GPU time (one session's lease is 15 minutes, start-up included): every step has its own time limit so one slow step cannot
# take the others down, and each step's log and results.json join one archive as soon as it ends.
set -u
OUT=$(realpath -m "${OUT:-results/gpu}")
mkdir -p "$OUT" /tmp/gpu
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then   # wheels carried to a machine without a package index
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    python3 -c "import importlib.util as u; print('flash_attn installed:', u.find_spec('flash_attn') is not None)"
} 2>&1 | tee /tmp/gpu/env.txt
run() {  # run LIMIT_SECONDS NAME COMMAND...
    local limit=$1 name=$2; shift 2
    echo "=== $name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" > "/tmp/gpu/$name.log" 2>&1
    echo "=== $name: exit $? after $((SECONDS - start)) s"
    grep -v "it/s\]$" "/tmp/gpu/$name.log" | tail -25
    # every engine's own JSON too: a step cut off by its time limit keeps the engines it finished
    (cd /tmp/gpu && tar rf "$OUT/gpu_results.tar" "$name.log" $(ls "$name"/*.json 2>/dev/null))
}
cp /tmp/gpu/env.txt "$OUT/env.txt"
run 120 pytest python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py tests/test_attention.py
run 30 quick python3 compare.py --device cuda --quick --cycles 1 --no-hf --out /tmp/gpu/quick
run 300 throughput64 python3 compare.py --device cuda --num-requests 64 --cycles 2,3,4,5,6,7 --out /tmp/gpu/throughput64
run 45 shared_prefix python3 compare.py --device cuda --workload shared_prefix --cycles 4,5 --no-hf --out /tmp/gpu/shared_prefix
run 60 long_context python3 compare.py --device cuda --workload long_context --cycles 5,6 --no-hf --out /tmp/gpu/long_context
run 90 bench_kernels python3 scripts/bench_kernels.py --out /tmp/gpu/bench_kernels/kernels.json
# Cycle 8 (bonus): decode steps/s at 256 sequences, cycle 7 against 8, with a profile (docs/CYCLE_GUIDE.md, chapter 10).
run 120 pytest_graphs python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_graphs.py
run 240 bench_step python3 scripts/bench_step.py --device cuda --profile /tmp/gpu/bench_step
# After the merge, once compare.py has the nano_vllm_bench workload and the cycles take quantization=None:
# run 300 nano_vllm_bench python3 compare.py --device cuda --workload nano_vllm_bench --cycles 7,8 --no-hf --out /tmp/gpu/nano_vllm_bench
# run 300 nano_vllm_bench_fp python3 compare.py --device cuda --workload nano_vllm_bench --cycles 7,8 --no-hf --option quantization=None --out /tmp/gpu/nano_vllm_bench_fp
run 150 online python3 compare.py --device cuda --workload online --cycles 3,4 --out /tmp/gpu/online
run 150 serve_online bash -c 'python3 -m cycle7_int8.serve Qwen/Qwen3-0.6B --device cuda --port 8123 & s=$!; python3 -m common.http_bench wait http://127.0.0.1:8123 90 && python3 compare.py --device cuda --workload online --base-url http://127.0.0.1:8123/v1 --model Qwen/Qwen3-0.6B --out /tmp/gpu/serve_online; kill $s'
