#!/bin/sh
# lm-eval's own HF transformers model on the converted SmolLM2 weights, float32 on the CPU.
# Run from the repository root. DIR: the converted SmolLM2 folder of the model cache.
DIR=${DIR:-$HOME/.cache/vllm-learn/HuggingFaceTB--SmolLM2-135M-Instruct}
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} timeout 1800 docs/results/lm-eval/lm_eval.sh \
  --model hf --model_args pretrained=$DIR,dtype=float32 --device cpu --batch_size 1 \
  --include_path docs/results/lm-eval/tasks --tasks vllm_learn_gen,vllm_learn_mc \
  --output_path docs/results/lm-eval/hf --log_samples
