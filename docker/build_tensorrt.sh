#!/usr/bin/env bash
# Build TensorRT plans (fp16, shape profiles) next to each encoder's model.onnx, for every version
# that has none yet. The graphs must be plain ONNX (`mailroute export --runtime native`: TensorRT's
# parser knows no onnxruntime fused ops). Profiles start at 1 x 1: a batch is padded to its longest
# row, so a 3-token email ("Refund?") alone must fit. Runs in the NGC TensorRT container (compose service `trt-builder`); the plans
# are used when Triton starts with --model-config-name=tensorrt (configs/tensorrt.pbtxt).
set -euo pipefail
REPO=${1:-/models}
build() {  # model, shape spec: min/opt/max batch x sequence
  local model=$1 inputs=$2 maxb=$3
  for v in "$REPO/$model"/[0-9]*; do
    [ -f "$v/model.onnx" ] && [ ! -f "$v/model.plan" ] || continue
    local min="" opt="" max=""
    for name in $inputs; do
      min+="${min:+,}$name:1x1"; opt+="${opt:+,}$name:${maxb}x128"; max+="${max:+,}$name:${maxb}x256"
    done
    echo "building $v/model.plan"
    trtexec --onnx="$v/model.onnx" --saveEngine="$v/model.plan" --fp16 \
      --minShapes="$min" --optShapes="$opt" --maxShapes="$max"
  done
}
build bi_encoder "input_ids attention_mask" 64
build cross_encoder "input_ids attention_mask token_type_ids" 256
