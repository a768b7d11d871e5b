"""The CPU side of one two-stage batch: what the classifier process spends besides the encoders (a script,
not a test). On a GPU the encoders take a few ms per 256 emails, so this work bounds the served throughput.

    python -m benchmarks.cpu_side [--emails 256] [--k 10] [--repeats 6] [--search faiss|torch] [--nearest]

Builds a run folder with tiny random encoders, the BANKING77 taxonomy and a label index shaped like the
trained one (117 exemplars per label, label cards; benchmarks/gpu/run.py), exports it, and times
`classify_texts` on ~128-token emails with encoders that return at once (normalisation, tokenising, search,
pair assembly, padding, fusion, answers). Prints the median, its split by stage and every repeat.
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

    flat_embed = embed  # the flat classifier's encoder, where the run fuses it

    def score(self, input_ids, attention_mask, token_type_ids):
        return np.zeros(input_ids.shape[0], np.float32)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--emails", type=int, default=256, help="emails per batch")
    ap.add_argument("--k", type=int, default=10, help="candidates reranked per email")
    ap.add_argument("--repeats", type=int, default=6, help="timed repetitions; the median is reported (default: 6)")
    ap.add_argument("--search", choices=("faiss", "torch"), default="faiss",
                    help="label search by FAISS on the CPU (portable runtime) or by torch (the torch runtime's; on the CPU here)")
    ap.add_argument("--nearest", action="store_true",
                    help="label cards of each label's exemplars nearest the email (CardSpec.nearest): made and tokenised per batch")
    a = ap.parse_args(argv)

    from benchmarks.gpu.run import base_tokenizer, random_run, synthetic_emails
    from export.run import ExportConfig, export
    from mailroute.repository import open_onnx_classifier

    work = Path(tempfile.mkdtemp(prefix="mailroute-cpu-side-"))
    try:
        tok = base_tokenizer(work / "tokenizer")
        run = random_run(work, tok, tiny=True, nearest_cards=a.nearest)
        export(ExportConfig(run=str(run), repo=str(work / "repo"), top_k=a.k))
        clf = open_onnx_classifier(work / "repo")
        clf.encoders = InstantEncoders(clf.index.index.d)
        if a.search == "torch":  # what the torch runtime serves: exemplars scored by torch (on the GPU there)
            clf.index = clf.index.on_device("cpu")
        texts, errors = clf.prepare(synthetic_emails(a.emails))
        clf.classify_texts(texts, errors, top_k=a.k, gate=False)  # warm: label tokens, tokenizer copies
        ms, stages = [], []
        for r in range(a.repeats):  # a new batch each time: nothing made for one batch's emails is met again
            texts, errors = clf.prepare(synthetic_emails(a.emails, seed=r + 1))
            t = time.perf_counter()
            answers = clf.classify_texts(texts, errors, top_k=a.k, gate=False)
            ms.append((time.perf_counter() - t) * 1e3)
            stages.append(answers[0].stage_ms)
        split = ", ".join(f"{k} {np.median([s[k] for s in stages]):.0f}" for k in stages[0])
        print(f"CPU side of one batch of {a.emails} emails, K={a.k}, label search by {a.search}{', nearest cards' if a.nearest else ''}: median {np.median(ms):.0f} ms "
              f"({a.emails / np.median(ms) * 1e3:.0f} emails/s per process; by stage, ms: {split}); "
              f"repeats: {', '.join(f'{m:.0f}' for m in ms)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
