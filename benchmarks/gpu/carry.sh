#!/usr/bin/env bash
# What the lent GPU machine lacks for benchmarks/gpu (it has PyTorch + CUDA, transformers, sentence-transformers,
# onnx, onnxruntime CPU, grpcio, protobuf, numpy 2.5; see ../shared/docs/gpu.md), prepared here in three git-ignored
# folders; a call carries one of them and the working tree (~11 MB in session 32, mostly committed raw results), so each
# must stay under 64 MiB minus the tree (the lines at the end add them up):
#   gpu-carry/a: site.tar.xz: nvidia-pytriton (tritonserver) and tritonclient, the wheels unpacked and xz-compressed
#                (34 MB instead of 55.5 as wheels: as wheels they left 0.6 MB for the tree in session 32)      Triton
#   gpu-carry/s: faiss-cpu, grpcio, protobuf, python-rapidjson, numpy 1.26.4 for the Triton backend
#                stub, the MiniLM tokenizer, datasets + dill + multiprocess                          (~48 MB)  serving
#   gpu-carry/b: site.tar.xz (faiss-cpu, datasets, dill, multiprocess: 10 MB instead of 20 as wheels), the base weights
#                as fp16 + xz (benchmarks/gpu/weights.py), a BANKING77 copy: everything a training call needs, in one
#                call                                                                                (~52 MB)  training
# Then the calls of benchmarks/gpu/device.sh on one warm machine (install a; install s + serve) or, for training alone,
# one call (install b + sweep / oof).
# Remove gpu-carry/ afterwards: the dataset is read in place everywhere else.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx "/gpu-carry/" .git/info/exclude 2>/dev/null || echo "/gpu-carry/" >> .git/info/exclude
PIP=(.venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_35_x86_64)
rm -rf gpu-carry/a gpu-carry/b gpu-carry/s  # nothing left from an earlier carry (a call carries the whole folder)
mkdir -p gpu-carry/a gpu-carry/b gpu-carry/s/stub-numpy gpu-carry/s/tokenizer
DATASETS=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)  # imported by training/ (the image's pyarrow 25 suits 5.2.0)
FAISS=faiss-cpu==1.15.1
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
site_tar() {  # site_tar OUT WHEEL...: what `pip install --target` would put there (the unpacked wheels, executable bits
  # kept: tritonserver, the backend stubs), xz-compressed; device.sh install unpacks it (these wheels have no
  # *.data/purelib or platlib parts; dill's *.data/scripts, console scripts nothing here runs, stay unplaced)
  local out=$1 w
  shift
  rm -rf "$SCRATCH/whl" "$SCRATCH/site"
  "${PIP[@]}" -d "$SCRATCH/whl" "$@"
  for w in "$SCRATCH"/whl/*.whl; do unzip -q -o "$w" -d "$SCRATCH/site"; done
  tar -C "$SCRATCH/site" -cf - . | xz -9e -T2 > "$out"
}
site_tar gpu-carry/a/site.tar.xz nvidia-pytriton==0.7.0 tritonclient==2.73.0
site_tar gpu-carry/b/site.tar.xz "$FAISS" "${DATASETS[@]}"
"${PIP[@]}" -d gpu-carry/s "$FAISS" grpcio==1.85.1 protobuf==6.33.6 python-rapidjson==1.25 "${DATASETS[@]}"
"${PIP[@]}" -d gpu-carry/s/stub-numpy numpy==1.26.4  # the stub of nvidia-pytriton 0.7.0 needs numpy < 2 (client/server.py)
.venv/bin/python -m benchmarks.gpu.weights pack gpu-carry/b/base.tar.xz
BANKING77=$(.venv/bin/python -c "from mailroute.settings import banking77_dir; print(banking77_dir())")
mkdir -p gpu-carry/b/banking77 && cp "$BANKING77"/train.csv "$BANKING77"/test.csv "$BANKING77"/categories.json gpu-carry/b/banking77/
# the base model's tokenizer files, one path a line (their names: training.models.TOKENIZER_FILES)
TOKENIZER_PATHS=$(.venv/bin/python -c "from training.models import TOKENIZER_FILES, base_model_dir; print(*(base_model_dir() / f for f in TOKENIZER_FILES), sep='\n')")
mapfile -t TOKENIZER <<< "$TOKENIZER_PATHS"
cp "${TOKENIZER[@]}" gpu-carry/s/tokenizer/
# what a call copies besides the folder: tracked files and untracked ones git does not ignore
TREE=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}' || true)
for d in gpu-carry/a gpu-carry/s gpu-carry/b; do  # each with the tree must stay under 64 MiB = 67,108,864 bytes
  n=$(( $(du -sb "$d" | cut -f1) + TREE ))
  echo "$d + tree: $n bytes$([ $n -lt 67108864 ] || echo '  OVER the 64 MiB a call may carry')"
done
