#!/usr/bin/env bash
# Build a TensorRT plan (fp16) next to each encoder version's model.onnx, for every version that has none yet.
# The shape profiles come with the version: `mailroute export` writes trtexec_shapes.txt (mailroute/repository.py
# TRTEXEC_SHAPES_FILE) next to every model.onnx TensorRT can parse, i.e. plain fp32 graphs (`mailroute export --runtime
# native`: TensorRT's parser knows no onnxruntime fused ops). It holds the --minShapes/--optShapes/--maxShapes flags, one
# a line, rendered from the encoder's inputs in mailroute/contract.py, its config's max_batch_size and its tokenizer's
# budget (export/configs.py trtexec_shapes); they are passed on as they are. Profiles start at 1 x 1: a batch is padded
# to its longest row, so a 3-token email ("Refund?") alone must fit. A version with model.onnx but no shapes file stops
# the build, named. Runs in the NGC TensorRT container (compose service `trt-builder`, where mailroute is not installed);
# the plans are used when Triton starts with --model-config-name=tensorrt (configs/tensorrt.pbtxt).
set -euo pipefail
REPO=${1:-/models}
SHAPES=trtexec_shapes.txt  # mailroute/repository.py TRTEXEC_SHAPES_FILE (tests/test_service_configs.py checks they agree)
for v in "$REPO"/*/[0-9]*; do
  [ -f "$v/model.onnx" ] && [ ! -f "$v/model.plan" ] || continue
  if [ ! -f "$v/$SHAPES" ]; then
    echo "build_tensorrt.sh: ${v#"$REPO"/} has model.onnx but no $SHAPES: TensorRT plans are built from the plain graphs" \
         "of \`mailroute export --runtime native\` (not fused, not int8), which write it; export that version again" >&2
    exit 1
  fi
  mapfile -t shapes < "$v/$SHAPES"
  for flag in "${shapes[@]}"; do
    case $flag in --minShapes=* | --optShapes=* | --maxShapes=*) ;; *)
      echo "build_tensorrt.sh: ${v#"$REPO"/}/$SHAPES: expected --minShapes=, --optShapes= or --maxShapes= lines, got '$flag'" >&2
      exit 1 ;;
    esac
  done
  echo "building $v/model.plan"
  trtexec --onnx="$v/model.onnx" --saveEngine="$v/model.plan" --fp16 "${shapes[@]}"
done
