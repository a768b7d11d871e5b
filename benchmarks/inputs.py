"""Benchmark inputs: BANKING77-length queries (~12 words) and email-length texts (~200 words)."""

import json
import random

from training.data import DEMO_TEST, load_banking77


def banking77_texts(n: int, seed: int = 0) -> list:
    rows = load_banking77().test
    rng = random.Random(seed)
    return [rng.choice(rows).text for _ in range(n)]


def email_texts(n: int, words: int = 200, seed: int = 0) -> list:
    """Demo test emails (raw: greetings, quotes, signatures) joined until each reaches `words` words."""
    raw = [json.loads(l) for l in DEMO_TEST.read_text().splitlines()]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        while sum(len(p.split()) for p in parts) < words:
            r = rng.choice(raw)
            parts.append(f"{r['subject']}\n\n{r['body']}")
        out.append(" ".join(" ".join(parts).split()[:words]))
    return out


def percentiles(ms: list) -> dict:
    import numpy as np

    a = np.asarray(ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}
