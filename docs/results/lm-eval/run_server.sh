#!/bin/sh
# lm-eval's local-completions model against our server (cycle 6), on the same converted SmolLM2
# weights, float32 on the CPU. Run from the repository root. The server is started here, with a
# timeout, and stopped by its pid.
DIR=${DIR:-$HOME/.cache/vllm-learn/HuggingFaceTB--SmolLM2-135M-Instruct}
PORT=${PORT:-18431}
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} timeout 1800 python -m cycle6_flash.serve "$DIR" --port $PORT \
  --dtype float32 --device cpu > docs/results/lm-eval/server.log 2>&1 &
SERVER=$!
for i in $(seq 1 120); do
  curl -sf http://127.0.0.1:$PORT/health > /dev/null && break
  sleep 2
done
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} timeout 1800 docs/results/lm-eval/lm_eval.sh \
  --model local-completions \
  --model_args model=$DIR,base_url=http://127.0.0.1:$PORT/v1/completions,tokenizer_backend=huggingface,tokenizer=$DIR,num_concurrent=1,max_retries=1 \
  --include_path docs/results/lm-eval/tasks --tasks vllm_learn_gen,vllm_learn_mc \
  --output_path docs/results/lm-eval/server --log_samples
STATUS=$?
kill $SERVER
wait $SERVER 2>/dev/null
exit $STATUS
