"""The CPU side of one two-stage batch: what the classifier process spends besides the encoders (a script,
not a test). On a GPU the encoders take a few ms per 256 emails, so this work bounds the served throughput.

    python -m benchmarks.cpu_side [--emails 256] [--k 10] [--repeats 6]

Builds a run folder with tiny random encoders and the BANKING77 taxonomy (benchmarks/gpu/run.py), exports
it, and times `classify_texts` on ~128-token emails with encoders that return at once (normalisation,
tokenising, search, pair assembly, padding, fusion, answers). Prints the median and every repeat.
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


class InstantEncoders:
    """The Encoders seam with no model behind it: random embeddings, zero logits."""

    def __init__(self, dim: int):
        self.dim, self.rng = dim, np.random.default_rng(0)

    def embed(self, input_ids, attention_mask):
        return self.rng.random((input_ids.shape[0], self.dim), dtype=np.float32)

    def score(self, input_ids, attention_mask, token_type_ids):
        return np.zeros(input_ids.shape[0], np.float32)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--emails", type=int, default=256, help="emails per batch")
    ap.add_argument("--k", type=int, default=10, help="candidates reranked per email")
    ap.add_argument("--repeats", type=int, default=6)
    a = ap.parse_args(argv)

    from benchmarks.gpu.run import random_run, synthetic_emails
    from export.run import ExportConfig, export
    from mailroute.repository import open_onnx_classifier
    from training.models import base_model_dir

    work = Path(tempfile.mkdtemp(prefix="mailroute-cpu-side-"))
    try:
        tok = work / "tokenizer"
        tok.mkdir()
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if (base_model_dir() / f).exists():
                shutil.copy(base_model_dir() / f, tok / f)
        run = random_run(work, tok, tiny=True)
        export(ExportConfig(run=str(run), repo=str(work / "repo"), top_k=a.k))
        clf = open_onnx_classifier(work / "repo")
        clf.encoders = InstantEncoders(clf.index.index.d)
        texts, errors = clf.prepare(synthetic_emails(a.emails))
        clf.classify_texts(texts, errors, top_k=a.k, gate=False)  # warm: label tokens, tokenizer copies
        ms = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            clf.classify_texts(texts, errors, top_k=a.k, gate=False)
            ms.append((time.perf_counter() - t) * 1e3)
        print(f"CPU side of one batch of {a.emails} emails, K={a.k}: median {np.median(ms):.0f} ms "
              f"({a.emails / np.median(ms) * 1e3:.0f} emails/s per process); repeats: {', '.join(f'{m:.0f}' for m in ms)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
