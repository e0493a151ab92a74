#!/usr/bin/env bash
# omniq build: TensorRT engines for the Omni encoders; run on the target (RTX PRO 6000 Blackwell 96GB, sm120):
# engines are specific to the GPU and TensorRT version that build them.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
trtexec --onnx="$HERE/vision.onnx" --saveEngine="$HERE/vision.plan" --fp16 --minShapes=pixels:1x3x128x128 --optShapes=pixels:8x3x128x128 --maxShapes=pixels:32x3x128x128 "$@"
trtexec --onnx="$HERE/audio.onnx" --saveEngine="$HERE/audio.plan" --fp16 --minShapes=features:1x101x64 --optShapes=features:2x101x64 --maxShapes=features:8x101x64 "$@"
