#!/usr/bin/env bash
# omniq build: serve the bundle (OpenAI-compatible server; extra trtllm-serve flags such as --host / --port pass through)
# target H200 SXM 141GB (sm90), TensorRT-LLM >=1.3.0rc7,<1.5.0, PyTorch backend
# FP8 weights, fp8 KV cache, MoE backend CUTLASS, tp 2 ep 1
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec trtllm-serve "$HERE/checkpoint" \
  --backend pytorch \
  --tp_size 2 \
  --ep_size 1 \
  --max_batch_size 128 \
  --max_num_tokens 8192 \
  --max_seq_len 32768 \
  --trust_remote_code \
  --extra_llm_api_options "$HERE/llm_api_options.yaml" \
  "$@"
