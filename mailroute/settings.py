"""Defaults shared by training, export and serving: each declared once here, so that the CLI, the configs, the
launcher and the client agree (a setting only one function reads keeps its default where it is declared)."""

import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# the model repository and run folder every command defaults to: in this checkout, whatever the working directory
DEFAULT_REPOSITORY = ROOT / "model_repository"
DEFAULT_RUN = ROOT / "runs" / "demo"


def shown(value) -> str:
    """A default as --help prints it: a path inside this checkout as <checkout>/..., so that help texts name no
    machine path (the value itself stays absolute, so commands work from any working directory)."""
    text = str(value)
    return "<checkout>" + text[len(str(ROOT)):] if text.startswith(str(ROOT) + os.sep) else repr(value)


def shared_dir() -> Path:
    """The workplace's shared folder (datasets, outside checks): $MAILROUTE_SHARED, else ../shared next to this
    checkout (a clone elsewhere sets the variable: .ci/run does)."""
    if os.environ.get("MAILROUTE_SHARED"):
        return Path(os.environ["MAILROUTE_SHARED"])
    return ROOT.parent / "shared"


def banking77_dir() -> Path:
    """BANKING77 is read in place (never copied): $MAILROUTE_BANKING77 or <shared>/datasets/banking77."""
    return Path(os.environ.get("MAILROUTE_BANKING77", shared_dir() / "datasets" / "banking77"))


# the feedback store when neither --db nor $MAILROUTE_FEEDBACK_URL names one (relative to the working
# directory); here rather than in feedback_store so that help texts need no SQLAlchemy (training machines lack it)
FEEDBACK_URL_ENV = "MAILROUTE_FEEDBACK_URL"
DEFAULT_FEEDBACK_URL = "sqlite:///feedback.sqlite3"


# where `mailroute serve` listens (Triton's own defaults) and where the client and `mailroute classify` call
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002
READY_PORT = 8003  # the launcher's proven readiness (GET /ready, /live)
DEFAULT_GRPC_URL = f"127.0.0.1:{GRPC_PORT}"
REQUEST_TIMEOUT_S = 30.0  # one classification request, client side (each retry gets it anew)
SERVER_START_TIMEOUT_S = 180.0  # `mailroute serve` waits this long for Triton to load the models and answer ready
CANARY_INTERVAL_S = 2.0  # seconds between the launcher's canary classifications (its proven readiness)
PRUNE_KEEP = 3  # newest classifier versions `mailroute versions prune` keeps (and the serving one, and as many rollback targets)


class BadSetting(ValueError):
    """A command-line setting out of its allowed values; the CLI prints it as one line."""


class BrokenFile(ValueError):
    """A file mailroute wrote (a run's rerank policy, a version's pipeline.json) that no longer reads as what it
    holds, e.g. cut off or edited by hand; the message names the file. A ValueError, so that code listing versions
    still skips an unreadable one; the CLI prints it as one line."""


def read_json(path: Path):
    """A JSON file mailroute wrote; BrokenFile naming it when it no longer parses (cut off, edited by hand, not UTF-8)."""
    import json

    try:
        return json.loads(Path(path).read_text())
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BrokenFile(f"unreadable {Path(path).name} ({path}): {e}") from None


@dataclass(frozen=True)
class Defaults:
    # candidates retrieved and reranked per email: training's --k-train/--k-eval, and the K of a served version whose
    # pipeline.json names none (export writes the run's --k-eval there). 5: recall@5 of a fine-tuned bi-encoder is ~99%
    # on the demo's validation split, at half the rerank cost of 10; benchmarks measuring K=10 pass it explicitly
    top_k: int = 5
    threshold: float = 0.5  # needs_review when the top probability is below this
    max_email_tokens: int = 128  # bi-encoder input budget (MiniLM was trained at 128/256)
    max_pair_tokens: int = 160  # cross-encoder (email, label text) pair budget
    max_email_chars: int = 20_000  # text beyond this is cut before tokenising: bounds the cost of huge input
    max_request_chars: int = 2_000_000  # a row longer than this is refused rather than truncated
    seed: int = 12
    embed_batch: int = 64  # emails per bi-encoder call inside one classifier batch (and per flat-encoder call, on the same tensors)
    score_batch: int = 256  # (email, label) pairs per cross-encoder call (256 emails x K=5 = 5 calls)
    # how long a request may wait in an encoder's queue for others to batch with (export --max-queue-delay-us)
    max_queue_delay_us: int = 500
    # the BLS classifier waits this many times the encoders' queue delay: it batches whole emails
    classifier_delay_factor: int = 4


DEFAULTS = Defaults()
