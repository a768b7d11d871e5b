"""Settings of `mailroute export` (light: the CLI builds its flags from this without importing torch or protobuf).

A field's --help is its `# comment`, or its metadata "help" where the text is rendered from another source."""

from dataclasses import dataclass, field

from export.runtimes import DEFAULT_RUNTIME, runtime_help
from mailroute.settings import DEFAULT_REPOSITORY, DEFAULT_RUN, DEFAULTS


@dataclass
class ExportConfig:
    run: str = str(DEFAULT_RUN)  # trained run folder (from `mailroute train`)
    repo: str = str(DEFAULT_REPOSITORY)  # Triton model repository to add the new versions to
    runtime: str = field(default=DEFAULT_RUNTIME, metadata={"help": runtime_help()})  # the help lists export/runtimes.py RUNTIMES
    gpu: bool = False  # KIND_GPU instances (native or torch runtime, production)
    no_optimize: bool = False  # skip onnxruntime's transformer fusions (attention, LayerNorm, GELU)
    quantize: bool = False  # dynamic int8 weights (CPU); the accuracy change is measured and reported
    quantize_eval: int = 500  # test emails of the run's dataset used to measure the int8 accuracy change (0 = all)
    version: int = 0  # 0 = next free version number of each model
    top_k: int = 0  # default candidates per email (callers may override per request); 0 = the K the run was evaluated with
    threshold: float = DEFAULTS.threshold  # default needs_review threshold (callers may override)
    encoders_in_classifier: bool = False  # torch runtime: each classifier instance runs the encoders itself, no BLS hop per stage (single-email latency)
    classifier_instances: int = 1  # email_classifier instances (BLS model; more help under load: 4 on a GPU)
    encoder_instances: int = 1  # instances of each encoder model
    preferred_batch_sizes: str = ""  # encoders' preferred batch sizes, e.g. "16,32,64" (empty: batch whatever is queued)
    max_queue_delay_us: int = field(default=DEFAULTS.max_queue_delay_us, metadata={"help": (
        f"encoders: microseconds a request may wait to be batched with others (the classifier waits "
        f"{DEFAULTS.classifier_delay_factor}x as long: it batches whole emails)")})
    max_queue_size: int = 0  # requests queued per model before new ones are refused at once (UNAVAILABLE); 0 = unbounded
