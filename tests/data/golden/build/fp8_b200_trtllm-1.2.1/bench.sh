#!/usr/bin/env bash
# omniq build: throughput benchmark of the bundle with trtllm-bench
# target B200 180GB (sm100), TensorRT-LLM >=1.2.0,<1.5.0, PyTorch backend
# FP8 weights, bf16 KV cache, MoE backend CUTLASS, tp 1 ep 1
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# MODEL labels the run and is the tokenizer source (a hub id or this checkpoint);
# NUM_REQUESTS / ISL / OSL shape the synthetic dataset written to DATASET when it does not exist.
MODEL="${MODEL:-$HERE/checkpoint}"
NUM_REQUESTS="${NUM_REQUESTS:-512}"
ISL="${ISL:-1024}"
OSL="${OSL:-256}"
DATASET="${DATASET:-$HERE/bench-dataset-${ISL}-${OSL}-${NUM_REQUESTS}.jsonl}"
if [ ! -f "$DATASET" ]; then
  trtllm-bench --model "$MODEL" \
    --model_path "$HERE/checkpoint" \
    prepare-dataset \
    --output "$DATASET" \
    token-norm-dist \
    --num-requests "$NUM_REQUESTS" \
    --input-mean "$ISL" \
    --output-mean "$OSL" \
    --input-stdev 0 \
    --output-stdev 0
fi
exec trtllm-bench --model "$MODEL" \
  --model_path "$HERE/checkpoint" \
  throughput \
  --backend pytorch \
  --dataset "$DATASET" \
  --tp 1 \
  --ep 1 \
  --max_batch_size 64 \
  --max_num_tokens 32768 \
  --max_seq_len 32768 \
  --extra_llm_api_options "$HERE/llm_api_options.yaml" \
  "$@"
