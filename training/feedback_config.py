"""Settings of `mailroute feedback train` (light: the CLI builds its flags from this without importing torch)."""

from dataclasses import dataclass

from mailroute.settings import DEFAULT_REPOSITORY, DEFAULTS, BadSetting
from training.config import DEFAULT_DEVICE, TrainConfig


@dataclass
class FeedbackConfig:
    repo: str = str(DEFAULT_REPOSITORY)  # Triton model repository holding the serving version
    db: str = ""  # feedback store URL, any SQLAlchemy URL (default $MAILROUTE_FEEDBACK_URL, else sqlite:///feedback.sqlite3: a file in the working directory)
    base_version: int = 0  # classifier version to start from (0 = the one serving)
    exemplars_only: bool = False  # first speed only: corrections become exemplars, the cross-encoder is not trained
    replay_ratio: float = 2.0  # original training emails replayed per correction (against forgetting)
    replay_run: str = ""  # run folder whose training emails are replayed (default: the source run of the version chain)
    epochs: float = 2.0  # continued listwise epochs over corrections + replay
    lr: float = TrainConfig.ce_lr / 2  # continued-training learning rate (half of training's: the head is not new)
    batch_size: int = TrainConfig.ce_batch_size  # emails per batch (x their candidates), as in training
    keep_policy: bool = False  # keep the base version's rerank policy instead of fitting it again on the evaluation split
    holdout_fraction: float = 0.2  # share of corrections (by email hash) kept out to measure the gate on
    max_eval_drop: float = 0.005  # the gate: evaluation-split accuracy may fall by at most this
    eval_limit: int = 0  # >0: at most this many emails of the evaluation split (faster gate)
    promote: bool = False  # serve the candidate when the gate passes
    url: str = ""  # running server's gRPC address for --promote (empty: only the config on disk changes)
    admin_key: str = ""  # the server's admin key for repository loads
    device: str = DEFAULT_DEVICE  # auto (CUDA when PyTorch sees a GPU) | cpu | cuda
    seed: int = DEFAULTS.seed  # replay sampling and shuffles

    def check(self) -> "FeedbackConfig":
        """BadSetting naming the first flag out of its range, before any model or store is opened."""
        rules = [("--holdout-fraction", self.holdout_fraction, 0.0 <= self.holdout_fraction < 1.0, "in [0, 1)"),
                 ("--replay-ratio", self.replay_ratio, self.replay_ratio >= 0, ">= 0"),
                 ("--epochs", self.epochs, self.epochs > 0, "> 0"),
                 ("--lr", self.lr, self.lr > 0, "> 0"),
                 ("--batch-size", self.batch_size, self.batch_size >= 1, ">= 1"),
                 ("--max-eval-drop", self.max_eval_drop, -1.0 <= self.max_eval_drop <= 1.0, "in [-1, 1] (negative: the candidate must gain as much)"),
                 ("--eval-limit", self.eval_limit, self.eval_limit >= 0, ">= 0 (0 = the whole evaluation split)"),
                 ("--base-version", self.base_version, self.base_version >= 0, ">= 0 (0 = the serving version)")]
        for flag, value, ok, allowed in rules:
            if not ok:
                raise BadSetting(f"{flag} must be {allowed}, got {value}")
        return self
