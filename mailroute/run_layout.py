"""The files of a training run folder (`mailroute train --out RUN`), named once for train, export and tests.

  RUN/bi_encoder/  RUN/cross_encoder/   sentence-transformers model folders
  RUN/flat_encoder/                     the flat classifier's encoder (the baseline: fused into the served answer, and the
                                        cross-encoder's start with --ce-init flat)
  RUN/flat_head.npz                     ... and its head over all labels (mailroute.flat_head.FlatHead)
  RUN/label_index/                      mailroute.label_index.LabelIndex (descriptions + exemplars + cards)
  RUN/rerank_policy.json                mailroute.rerank_policy.RerankPolicy fitted on validation
  RUN/rerank_policy_without_flat.json   ... and the two stages' own (gate too), where the first fuses the flat classifier
  RUN/config.json  RUN/metrics.json  RUN/report.md  RUN/predictions.jsonl  RUN/abstention.png
  RUN/study_k10.npz                     scores cached by benchmarks/fusion_study.py (both stages at K=10)
  RUN/study_embeddings.npz              ... and the validation and test embeddings its probe reads
  RUN/study_flat_e5.npz                 ... and a flat baseline's validation and test probabilities (--flat, 5 epochs)
  RUN/heldout_k5.npz                    scores of a --holdout-fold run's held-out emails (benchmarks/oof_choice.py)
  RUN/heldout_flat_e5.npz               ... and a flat baseline's probabilities for them and for validation (5 epochs;
                                        benchmarks/heldout_flat.py)
"""

import json
from pathlib import Path

BI_ENCODER_DIR = "bi_encoder"
CROSS_ENCODER_DIR = "cross_encoder"
FLAT_ENCODER_DIR = "flat_encoder"
FLAT_HEAD_FILE = "flat_head.npz"  # also in a classifier version of the repository
LABEL_INDEX_DIR = "label_index"
POLICY_FILE = "rerank_policy.json"
POLICY_WITHOUT_FLAT_FILE = "rerank_policy_without_flat.json"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
PREDICTIONS_FILE = "predictions.jsonl"
ABSTENTION_PLOT = "abstention.png"
STUDY_CACHE = "study_k{k}.npz"
STUDY_EMBEDDINGS = "study_embeddings.npz"
STUDY_FLAT = "study_flat_e{epochs}.npz"
HELDOUT_CACHE = "heldout_k{k}.npz"
HELDOUT_FLAT = "heldout_flat_e{epochs}.npz"


def read_predictions(path) -> list:
    """The rows of a predictions.jsonl (one test email a line, in the test split's order: gold, label, probability,
    reranked, and flat_label / flat_probability where the run has a flat baseline)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class RunFolder:
    """Paths of one run folder."""

    def __init__(self, root):
        self.root = Path(root)
        self.bi_encoder = self.root / BI_ENCODER_DIR
        self.cross_encoder = self.root / CROSS_ENCODER_DIR
        self.flat_encoder = self.root / FLAT_ENCODER_DIR
        self.flat_head = self.root / FLAT_HEAD_FILE
        self.label_index = self.root / LABEL_INDEX_DIR
        self.policy = self.root / POLICY_FILE
        self.policy_without_flat = self.root / POLICY_WITHOUT_FLAT_FILE
        self.config = self.root / CONFIG_FILE
        self.metrics = self.root / METRICS_FILE
        self.report = self.root / REPORT_FILE
        self.predictions = self.root / PREDICTIONS_FILE
        self.abstention_plot = self.root / ABSTENTION_PLOT
        self.study_embeddings = self.root / STUDY_EMBEDDINGS

    def study_cache(self, k: int) -> Path:
        return self.root / STUDY_CACHE.format(k=k)

    def study_flat(self, epochs: int) -> Path:
        return self.root / STUDY_FLAT.format(epochs=epochs)

    def heldout_cache(self, k: int) -> Path:
        return self.root / HELDOUT_CACHE.format(k=k)

    def heldout_flat(self, epochs: int) -> Path:
        return self.root / HELDOUT_FLAT.format(epochs=epochs)

    def has_flat(self) -> bool:
        """The run kept its flat classifier (encoder and head)."""
        return self.flat_encoder.is_dir() and self.flat_head.exists()

    def is_trained(self) -> bool:
        return self.bi_encoder.is_dir() and self.cross_encoder.is_dir() and self.label_index.is_dir()
