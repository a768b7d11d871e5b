#!/usr/bin/env bash
# What the lent GPU machine lacks for benchmarks/gpu/run.py (it has PyTorch + CUDA, transformers,
# sentence-transformers, onnx and onnxruntime CPU; see ../shared/docs/gpu.md), downloaded here as
# cp312 wheels into two git-ignored folders, each under the 64 MiB carry limit of one call:
#   gpu-carry/a: nvidia-pytriton (tritonserver), tritonclient, grpcio, protobuf, python-rapidjson  (~62 MiB)
#   gpu-carry/b: faiss-cpu, datasets + dill + multiprocess, the MiniLM tokenizer files              (~20 MiB)
# Then, on the device (files outside the working tree survive about 30 s between calls on a warm machine):
#   call 1 (carry gpu-carry/a): pip install --no-index --no-deps --target /tmp/mr-site gpu-carry/a/*.whl
#   call 2 (carry gpu-carry/b): pip install --no-index --no-deps --target /tmp/mr-site gpu-carry/b/*.whl &&
#           PYTHONPATH=/tmp/mr-site:. python3 -m benchmarks.gpu.run --device cuda --tokenizer gpu-carry/b/tokenizer
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx "/gpu-carry/" .git/info/exclude 2>/dev/null || echo "/gpu-carry/" >> .git/info/exclude
PIP=(.venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_35_x86_64)
mkdir -p gpu-carry/a gpu-carry/b/tokenizer
"${PIP[@]}" -d gpu-carry/a nvidia-pytriton==0.7.0 tritonclient==2.73.0 grpcio==1.85.1 protobuf==6.33.6 python-rapidjson==1.25
"${PIP[@]}" -d gpu-carry/b faiss-cpu==1.15.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19  # datasets: imported by training/
BASE=$(.venv/bin/python -c "from training.models import base_model_dir; print(base_model_dir())")
cp "$BASE"/tokenizer.json "$BASE"/tokenizer_config.json "$BASE"/vocab.txt gpu-carry/b/tokenizer/
cp "$BASE"/special_tokens_map.json gpu-carry/b/tokenizer/ 2>/dev/null || true
du -sh gpu-carry/a gpu-carry/b
