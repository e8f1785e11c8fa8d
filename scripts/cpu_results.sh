#!/usr/bin/env bash
# The CPU runs behind the guide's later CPU tables, one after another on an idle
# machine (any other torch process on 2 cores distorts every figure): results land in docs/results/.
# About 45 minutes on a 2-core machine. STEPS="online throughput" runs just those.
set -u
cd "$(dirname "$0")/.."
steps=${STEPS:-"online timeout throughput bench_step http slots int8 sweep c56 paired compile decode2 detok sse figures"}
has() { [[ " $steps " == *" $1 "* ]]; }
has online && python compare.py --workload online --cycles 3,4 --plot --out docs/results/cpu-online
has timeout && python compare.py --cycles 1,2 --num-requests 8 --timeout 25 --plot --out docs/results/cpu-timeout
has throughput && python compare.py --workload throughput --plot --out docs/results/cpu-throughput-all   # (bare --plot is the suite)
has bench_step && python scripts/bench_step.py --device cpu --profile docs/results/cpu-bench-step | tee docs/results/cpu-bench-step.txt
if has http; then
    python -m cycle8_graphs.serve HuggingFaceTB/SmolLM2-135M-Instruct --port 8011 > /tmp/serve.log 2>&1 & server=$!
    python -m common.benchmark.http_bench wait http://127.0.0.1:8011 120 && python compare.py --workload online \
        --base-url http://127.0.0.1:8011/v1 --model HuggingFaceTB/SmolLM2-135M-Instruct --out docs/results/cpu-online-http
    kill $server
fi
if has slots; then
    for n in 16 32 64; do
        python compare.py --cycles 4 --num-requests 64 --no-hf --option max_num_seqs=$n --out docs/results/cpu-throughput-64-seqs$n
    done
fi
has int8 && python scripts/int8_matmul_cpu.py > docs/results/cpu-int8-matmul.txt
has sweep && python compare.py --workload online --cycles 3,4 --request-rate 0.5,1,2,4 --plot --out docs/results/cpu-online-sweep
if has c56; then   # cycles 5 and 6 again: their difference is within this machine's run-to-run spread
    for out in cpu-throughput-c56-repeat cpu-throughput-c56-repeat2 cpu-throughput-c56-repeat3; do
        python compare.py --cycles 5,6 --no-hf --out docs/results/$out
    done
fi
if has paired; then   # cycles 7 and 8 alternately, three times each
    for i in 1 2 3; do
        for e in cycle7_int8 cycle8_graphs; do
            python -m common.benchmark.bench --engine $e --device cpu --out docs/results/cpu-c78-paired/alt-$e-$i.json
        done
    done
fi
has compile && python scripts/bench_step.py --device cpu --cycles cycle8_graphs --compile > docs/results/cpu-bench-step-compile.txt 2>&1
if has decode2; then   # one decode step at 2 running sequences, cycles 7 and 8, with a profile
    for e in cycle7_int8 cycle8_graphs; do
        python scripts/decode_step_cpu.py $e 2>/dev/null | grep -v USDT > docs/results/cpu-decode-2seqs-$e.txt
    done
fi
has detok && python scripts/detokenizer_example.py > docs/results/detokenizer-emoji.txt
if has sse; then   # chapter 9's SSE transcript: cycle 4's server, one short streamed completion
    python -m cycle4_batching.serve HuggingFaceTB/SmolLM2-135M-Instruct --port 8012 > /tmp/serve-sse.log 2>&1 & server=$!
    body='{"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}'
    if python -m common.benchmark.http_bench wait http://127.0.0.1:8012 120; then
        { echo "# python -m cycle4_batching.serve HuggingFaceTB/SmolLM2-135M-Instruct --host 127.0.0.1 --port PORT"
          echo "# curl -sN localhost:PORT/v1/completions -H 'content-type: application/json' -d '$body'"
          echo "# (CPU, fp32, real weights; the server killed by pid afterwards)"
          curl -sN localhost:8012/v1/completions -H 'content-type: application/json' -d "$body"; } > docs/results/sse-completions.txt
    fi
    kill $server
fi
if has figures; then   # the guide's drawn figures (seconds, no model) and the suite's summary chart, redrawn from its stored run
    python scripts/make_figures.py
    python -m common.benchmark.plots --summary docs/results/cpu-course-suite/summary.png docs/results/cpu-course-suite/results.json
fi
