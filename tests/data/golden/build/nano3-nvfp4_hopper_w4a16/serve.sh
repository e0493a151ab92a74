#!/usr/bin/env bash
# omniq build: serve the bundle (OpenAI-compatible server; extra trtllm-serve flags such as --host / --port pass through)
# target H100 SXM 80GB (sm90), TensorRT-LLM >=1.3.0rc18,<1.5.0, PyTorch backend
# NVFP4 weights, fp8 KV cache, MoE backend MARLIN, tp 1 ep 1
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec trtllm-serve "$HERE/checkpoint" \
  --backend pytorch \
  --tp_size 1 \
  --ep_size 1 \
  --max_batch_size 64 \
  --max_num_tokens 8192 \
  --max_seq_len 32768 \
  --extra_llm_api_options "$HERE/llm_api_options.yaml" \
  "$@"
