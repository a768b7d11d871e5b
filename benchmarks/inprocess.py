"""In-process two-stage throughput: PyTorch (reference classifier) vs ONNX Runtime (the served graphs).

    python -m benchmarks.inprocess --run runs/demo --repo model_repository --n 256 --batch 32

Same pipeline code, same tokenisation, same K; only the encoder runtime differs.
"""

import argparse
import json
import platform
import time

import torch

from benchmarks.inputs import banking77_texts, email_texts
from mailroute.repository import open_onnx_classifier
from mailroute.settings import DEFAULT_REPOSITORY, DEFAULT_RUN, shown
from training.reference import load_reference


def throughput(clf, texts: list, batch: int, k: int) -> float:
    clf.classify(texts[:batch], top_k=k)  # warm-up (allocations, lazy init)
    t = time.perf_counter()
    for s in range(0, len(texts), batch):
        clf.classify(texts[s:s + batch], top_k=k)
    return len(texts) / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(DEFAULT_RUN), help=f"trained run: the PyTorch reference (default: {shown(DEFAULT_RUN)})")
    ap.add_argument("--repo", default=str(DEFAULT_REPOSITORY), help=f"its export: the onnxruntime classifier (default: {shown(DEFAULT_REPOSITORY)})")
    ap.add_argument("--n", type=int, default=256, help="emails per measurement (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=32, help="emails per classify call (default: %(default)s)")
    ap.add_argument("--k", type=int, default=10, help="candidates reranked per email (default: %(default)s)")
    ap.add_argument("--int8-repo", default="", help="also measure this repository (an export with --quantize)")
    a = ap.parse_args()
    systems = {"pytorch": load_reference(a.run), "onnxruntime": open_onnx_classifier(a.repo)}
    if a.int8_repo:
        systems["onnxruntime_int8"] = open_onnx_classifier(a.int8_repo)
    results = {"machine": platform.platform(), "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "k": a.k, "batch": a.batch}
    for name, texts in (("banking77_length", banking77_texts(a.n)), ("email_200_words", email_texts(a.n))):
        row = {s: throughput(clf, texts, a.batch, a.k) for s, clf in systems.items()}
        row["onnx_speedup"] = row["onnxruntime"] / row["pytorch"]
        if "onnxruntime_int8" in row:
            row["int8_speedup"] = row["onnxruntime_int8"] / row["pytorch"]
        results[name] = row
        print(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
