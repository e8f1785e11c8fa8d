#!/usr/bin/env bash
# The one prepared GPU check: the CUDA tests, then the compare.py runs behind the guide's CUDA tables.
# Run on a CUDA machine from the repository root; results land in $OUT (default: results/gpu).
#
#   bash scripts/gpu_check.sh            # every step, in priority order, within BUDGET_S
#   bash scripts/gpu_check.sh --dry-run  # the steps and their limits, nothing run
#   ONLY="name1 name2" bash scripts/gpu_check.sh   # just those steps (a later GPU run picks up the rest)
#
# Budget: BUDGET_S (default 540 s, machine start-up not counted). Steps come in the order of what
# only a GPU can tell: the kernels compiled and checked (the CUDA tests; the first thing timed,
# from a cold machine), CUDA graph capture and replay, the default comparison, kernel bandwidth,
# the cycle 8 against 7 decode step profile; then the rest. The priority steps' limits add up to
# 420 s at most (tests/test_gpu_check.py checks it with --dry-run). Each step's limit is cut to
# what the budget has left; a step that would get under 20 s is skipped and says so.
#
# A step cannot outlive its limit: it runs as a process group of its own (setsid), and at its limit
# gets SIGTERM (compare.py then stops its engine and writes the rows it has), then, 10 s later,
# SIGKILL, sent to its process group and to every process it started, wherever they run (an engine
# that setsid put in a group of its own included). The same happens when the script itself is stopped (an outer
# `timeout`, Ctrl-C): the running step is ended and what exists is archived.
#
# $OUT receives env.txt, steps.txt (one line per step: exit status, seconds, limit) and
# gpu_results.tar.gz: each step's log and everything it wrote in its folder (results.json,
# per-engine JSON, charts, bench_step's profile text), appended as soon as the step ends.
# Exit status of a compare.py step: 0 all measured, 1 an engine failed, 3 an engine timed out or
# was refused for memory (its row is missing); 124 the step hit its time limit.
set -u
GRACE_S=10

# name, limit (seconds), priority (1) or not (0), command. Keep the priority limits' sum <= 420.
STEPS=(
  "pytest|110|1|python3 -m pytest -q -m cuda -p no:cacheprovider --durations=15 tests/ --ignore=tests/test_graphs.py"
  "graphs|45|1|python3 -m pytest -q -m cuda -p no:cacheprovider --durations=5 tests/test_graphs.py"
  "throughput|165|1|python3 compare.py --device cuda --cycles 1-7 --plot --timeout 60 --out /tmp/gpu/throughput"
  "bench_kernels|45|1|python3 scripts/bench_kernels.py --out /tmp/gpu/bench_kernels/kernels.json"
  "bench_step|55|1|python3 scripts/bench_step.py --device cuda --profile /tmp/gpu/bench_step"
  "nano_c78|150|0|python3 compare.py --device cuda --workload nano_vllm_bench --cycles 7,8 --no-hf --timeout 70 --out /tmp/gpu/nano_c78"
  "shared_prefix|45|0|python3 compare.py --device cuda --workload shared_prefix --cycles 4,5 --no-hf --timeout 40 --out /tmp/gpu/shared_prefix"
  "long_context|75|0|python3 compare.py --device cuda --workload long_context --cycles 5-7 --no-hf --timeout 60 --out /tmp/gpu/long_context"
  "nano_fp|150|0|python3 compare.py --device cuda --workload nano_vllm_bench --cycles 7,8 --no-hf --option quantization=None --timeout 70 --out /tmp/gpu/nano_fp"
  "nano_vllm_bench|300|0|python3 compare.py --device cuda --workload nano_vllm_bench --cycles 4-6 --no-hf --timeout 90 --out /tmp/gpu/nano_vllm_bench"
  "online|150|0|python3 compare.py --device cuda --workload online --cycles 3,4 --timeout 70 --out /tmp/gpu/online"
  "mixed_c89|180|0|python3 -m common.benchmark.mixed_arrivals --device cuda --model Qwen/Qwen3-0.6B --cycles cycle8_graphs,cycle9_chunked --budgets 512,2048,default --plot --out /tmp/gpu/mixed_c89"
  "copy_c910|150|0|python3 compare.py --device cuda --workload copy --cycles 9,10 --no-hf --timeout 60 --speculative-config '{\"method\": \"ngram\", \"num_speculative_tokens\": 4, \"prompt_lookup_min\": 2, \"prompt_lookup_max\": 4}' --out /tmp/gpu/copy_c910"
  "tp_c1011|120|0|python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_tp.py; python3 compare.py --device cuda --workload throughput --cycles 10,11 --no-hf --timeout 60 --out /tmp/gpu/tp_c1011"
  "serve_vs_vllm|300|0|if python3 -c 'import vllm' 2>/dev/null; then VLLM_PY=python3 NAME=gpu-vs-vllm-served RATES='1 4' NUM_PROMPTS=32 bash scripts/vs_vllm.sh && cp -r docs/results/gpu-vs-vllm-served /tmp/gpu/serve_vs_vllm; else echo 'no vllm on this machine: serve_online runs our server alone'; fi"
  "serve_online|150|0|python3 -m cycle8_graphs.serve Qwen/Qwen3-0.6B --device cuda --port 8123 & s=\$!; python3 -m common.benchmark.http_bench wait http://127.0.0.1:8123 90 && python3 compare.py --device cuda --workload online --base-url http://127.0.0.1:8123/v1 --model Qwen/Qwen3-0.6B --out /tmp/gpu/serve_online; kill \$s"
)

if [ "${1:-}" = "--dry-run" ]; then   # name, limit, priority, command: nothing is run
    for step in "${STEPS[@]}"; do
        IFS='|' read -r name limit priority command <<< "$step"
        printf '%-16s %4ss  %-8s %s\n' "$name" "$limit" "$([ "$priority" = 1 ] && echo priority || echo rest)" "$command"
    done
    exit 0
fi

OUT=$(realpath -m "${OUT:-results/gpu}")
mkdir -p "$OUT" /tmp/gpu
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then   # wheels carried to a machine without a package index
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
BUDGET_S=${BUDGET_S:-540}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    python3 -c "import importlib.util as u; print('flash_attn installed:', u.find_spec('flash_attn') is not None)"
} 2>&1 | tee /tmp/gpu/env.txt
cp /tmp/gpu/env.txt "$OUT/env.txt"
: > "$OUT/steps.txt"

descendants() {  # every process below PID, children first found (a snapshot: killing reparents them)
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$child"
        descendants "$child"
    done
}

end_step() {  # end_step PID: SIGTERM to the step's group and everything it started, SIGKILL after GRACE_S
    local pid=$1 all waited=0
    all="$pid $(descendants "$pid")"
    kill -TERM -- "-$pid" $all 2>/dev/null
    while kill -0 "$pid" 2>/dev/null && (( waited < GRACE_S )); do sleep 1; waited=$((waited + 1)); done
    all="$all $(descendants "$pid")"
    kill -KILL -- "-$pid" $all 2>/dev/null
}

archive() {  # archive NAME: the step's log and everything in its folder, into $OUT at once
    (cd /tmp/gpu && tar rf "$OUT/gpu_results.tar" "$1.log" $(find "$1" -type f 2>/dev/null))
}

STEP_PID="" STEP_NAME=""
on_signal() {  # the script itself is stopped: end the running step, keep what exists
    if [ -n "$STEP_PID" ]; then
        end_step "$STEP_PID"
        echo "$STEP_NAME: stopped with the script after $SECONDS s of the ${BUDGET_S}s budget" | tee -a "$OUT/steps.txt"
        archive "$STEP_NAME"
    fi
    gzip -f "$OUT/gpu_results.tar" 2>/dev/null
    exit 143
}
trap on_signal TERM INT HUP

run() {  # run NAME LIMIT COMMAND   (LIMIT is cut to what the budget has left)
    local name=$1 limit=$2 command=$3
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    local left=$((BUDGET_S - SECONDS))
    (( limit > left )) && limit=$left
    if (( limit < 20 )); then
        echo "=== $name: skipped, ${left}s left of the ${BUDGET_S}s budget" | tee -a "$OUT/steps.txt"
        return
    fi
    echo "=== $name (limit ${limit}s): $command"
    local start=$SECONDS status
    mkdir -p "/tmp/gpu/$name"
    setsid --wait bash -c "$command" > "/tmp/gpu/$name.log" 2>&1 &
    STEP_PID=$! STEP_NAME=$name
    # Polled, not waited on: the trap above runs within a second of a signal.
    while kill -0 "$STEP_PID" 2>/dev/null && (( SECONDS - start < limit )); do sleep 1; done
    if kill -0 "$STEP_PID" 2>/dev/null; then
        end_step "$STEP_PID"
        wait "$STEP_PID" 2>/dev/null
        status=124
    else
        wait "$STEP_PID"
        status=$?
    fi
    STEP_PID=""
    echo "$name: exit $status after $((SECONDS - start))s (limit ${limit}s)" | tee -a "$OUT/steps.txt"
    grep -v "it/s\]$" "/tmp/gpu/$name.log" | tail -30
    archive "$name"
}

for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit priority command <<< "$step"
    run "$name" "$limit" "$command"
done

echo "=== done after ${SECONDS}s of the ${BUDGET_S}s budget" | tee -a "$OUT/steps.txt"
gzip -f "$OUT/gpu_results.tar"   # the JSON holds every token id: compressed it stays far below 16 MiB
