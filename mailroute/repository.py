"""The layout of the Triton model repository, read by the Triton adapters and by in-process users.

  <repo>/bi_encoder/<v>/      model.onnx  tokenizer.json  encoder_id   (+ model.py when portable or torch; + pytorch/ when torch;
                                                                        + trtexec_shapes.txt when model.onnx is plain fp32 ONNX)
  <repo>/cross_encoder/<v>/   model.onnx  tokenizer.json  encoder_id   (+ model.py when portable or torch; + pytorch/ when
                                                                        torch or made by continued training; + trtexec_shapes.txt likewise)
  <repo>/flat_encoder/<v>/    as bi_encoder: the flat classifier's encoder (where a run kept one)
  <repo>/email_classifier/<v>/ model.py  pipeline.json  label_index/  (+ flat_head.npz where it pins a flat_encoder;
                                                                        export_report.json when exported,
                                                                        gate_report.json when made from feedback)
  <repo>/<encoder>/configs/tensorrt.pbtxt   the config of the TensorRT plans (docker/build_tensorrt.sh)
  <repo>/email_classifier/config.pbtxt   its version policy names the serving version (export.versions)
pipeline.json pins the bi_encoder and cross_encoder (and flat_encoder) versions this classifier version uses and
holds its rerank policy (fusion, temperature, gate: mailroute.rerank_policy); the label index inside it records
the encoder_id of the bi-encoder it was built from, the flat head that of the flat encoder, and loading refuses a
mismatch. So a classifier version is one consistent, roll-back-able unit.
"""

import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from mailroute import contract
from mailroute.flat_head import FlatHead
from mailroute.label_index import IndexMismatch, LabelIndex
from mailroute.pipeline import TwoStageClassifier, load_tokenizer
from mailroute.rerank_policy import RerankPolicy
from mailroute.run_layout import FLAT_HEAD_FILE, LABEL_INDEX_DIR  # the same names in a classifier version; importable from here
from mailroute.settings import DEFAULTS, BrokenFile

MODEL_FILE, TOKENIZER_FILE, ENCODER_ID_FILE = "model.onnx", "tokenizer.json", "encoder_id"
PIPELINE_FILE = "pipeline.json"
CONFIG_FILE = "config.pbtxt"  # <model>/: Triton's model configuration
HISTORY_FILE = "promotions.jsonl"  # email_classifier/: one line per change of the serving version (export.versions)
# <model>/<v>/: the Python-backend adapter Triton runs for a version (export/triton/<adapter> copied in, or the version's
# parent's when derived); encoders have one only under a Python-backend runtime (export/runtimes.py adapter)
ADAPTER_FILE = "model.py"
EXPORT_REPORT_FILE = "export_report.json"  # email_classifier/<v>/: what `mailroute export` measured (parity, int8, timing)
# <encoder>/: the tensorrt_plan config Triton reads instead of config.pbtxt when started with --model-config-name=tensorrt
# (docker-compose.yml's tensorrt profile, over the plans docker/build_tensorrt.sh builds)
CONFIGS_DIR = "configs"
TENSORRT_CONFIG = f"{CONFIGS_DIR}/tensorrt.pbtxt"
# <encoder>/<v>/: trtexec's shape-profile flags (export.configs.trtexec_shapes), written next to a model.onnx that TensorRT
# can parse (plain graph, not int8); docker/build_tensorrt.sh builds model.plan from the two and names this file too
TRTEXEC_SHAPES_FILE = "trtexec_shapes.txt"
GATE_REPORT_FILE = "gate_report.json"  # email_classifier/<v>/: the promotion gate's measurements of this version
# <encoder>/<v>/pytorch/: the PyTorch weights behind an encoder version. `mailroute export --runtime torch` writes them
# for every encoder (what that runtime serves: export/run.py, mailroute/torch_encoders.py); continued training writes
# them for its cross_encoder version (what the next round continues from). Without them, an exported version's
# weights are its pipeline's source_run
TORCH_WEIGHTS_DIR = "pytorch"
# the Hugging Face weights file that sentence-transformers saves in an encoder folder (a run's bi_encoder/ and
# cross_encoder/, a version's pytorch/); a run's label index pins the bi-encoder by its hash (mailroute.label_index.weights_id),
# while in the repository an encoder version's encoder_id and a version's index manifest hash its exported model.onnx
WEIGHTS_FILE = "model.safetensors"


def versions(repo, model: str) -> list:
    folder = Path(repo) / model
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()) if folder.is_dir() else []


def encoder_models(repo) -> list:
    """The encoder models of a repository: those every repository has, and the flat encoder where it has a version (a
    prune may leave its folder without one)."""
    return [m for m in contract.ENCODERS if m in contract.MODELS or versions(repo, m)]


def read_model_config(repo, model: str = contract.CLASSIFIER):
    """<repo>/<model>/config.pbtxt parsed as Triton's `ModelConfig` protobuf."""
    from google.protobuf import text_format  # here: the adapters import this module, and Triton's stub needs neither
    from tritonclient.grpc import model_config_pb2

    path = Path(repo) / model / CONFIG_FILE
    cfg = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(path.read_text(), cfg)
    except text_format.ParseError as e:
        raise BrokenFile(f"{path} is not a Triton model configuration ({e})") from None
    return cfg


def encoders_in_classifier(repo) -> bool:
    """Whether the classifier's config runs the encoders in its own process (`mailroute export --encoders-in-classifier`)
    rather than through BLS calls to the encoder models; one config says it for all its versions."""
    if not (Path(repo) / contract.CLASSIFIER / CONFIG_FILE).is_file():
        return False
    param = read_model_config(repo).parameters.get(contract.ENCODERS_PARAMETER)
    return param is not None and param.string_value == contract.ENCODERS_IN_PROCESS


def served_encoder_models(repo) -> list:
    """The encoder models a server over this repository must load: none where the classifier runs the encoders itself
    (nothing calls them; each would only add backend processes, memory and, on a GPU, CUDA-graph captures)."""
    return [] if encoders_in_classifier(repo) else encoder_models(repo)


def version_dir(repo, model: str, version=None) -> Path:
    vs = versions(repo, model)
    if not vs:
        raise FileNotFoundError(f"no versions of model {model!r} in repository {repo}")
    v = vs[-1] if version in (None, -1, "latest") else int(version)
    if v not in vs:
        raise FileNotFoundError(f"model {model!r} has no version {v} in {repo} (has {vs})")
    return Path(repo) / model / str(v)


@dataclass(frozen=True)
class PipelineSpec:
    """A classifier version's pipeline.json: the encoder versions it pins, how it answers and where it came from
    (the one place its keys are named). Keys this code does not know (a newer mailroute's) are kept in `other` and
    written back unchanged."""
    bi_encoder_version: int
    cross_encoder_version: int
    top_k: int = DEFAULTS.top_k
    threshold: float = DEFAULTS.threshold
    policy: dict = field(default_factory=dict)  # RerankPolicy JSON form
    kind: str = "export"  # export | exemplars | continued | label: how the version was made
    parent: int = None  # the classifier version a derived one was made from
    note: str = None
    created: str = None  # utc_stamp()
    source_run: str = None  # the training run an export came from (derived versions: their ancestors')
    quantized: bool = False  # int8 encoders: continued training writes int8 cross-encoders again
    feedback: dict = None  # what a feedback round used (corrections, held out, new exemplars)
    flat_encoder_version: int = None  # the flat classifier's encoder (its head is the version's flat_head.npz); None = none
    policy_without_flat: dict = None  # the two stages' own policy (fitted with the run): what a derived version dropping it serves
    other: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "PipelineSpec":
        if not isinstance(d, dict):
            raise ValueError(f"{PIPELINE_FILE} holds {type(d).__name__}, not a JSON object")
        missing = [k for k in ("bi_encoder_version", "cross_encoder_version") if k not in d]
        if missing:
            raise ValueError(f"{PIPELINE_FILE} pins no {' and no '.join(missing)}")
        try:
            pins = {k: int(d[k]) for k in ("bi_encoder_version", "cross_encoder_version")}
        except (TypeError, ValueError):
            raise ValueError(f"{PIPELINE_FILE} pins versions that are not numbers: {d['bi_encoder_version']!r}, "
                             f"{d['cross_encoder_version']!r}") from None
        known = {f.name for f in fields(cls)} - {"other"}
        if d.get("flat_encoder_version") is not None:
            try:
                pins["flat_encoder_version"] = int(d["flat_encoder_version"])
            except (TypeError, ValueError):
                raise ValueError(f"{PIPELINE_FILE} pins a flat_encoder_version that is not a number: {d['flat_encoder_version']!r}") from None
        return cls(**{k: v for k, v in d.items() if k in known} | pins, other={k: v for k, v in d.items() if k not in known})

    def pins(self) -> dict:
        """{encoder model: version} of the encoders this version uses."""
        pinned = {contract.BI_ENCODER: self.bi_encoder_version, contract.CROSS_ENCODER: self.cross_encoder_version}
        return pinned | ({} if self.flat_encoder_version is None else {contract.FLAT_ENCODER: self.flat_encoder_version})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "other" and getattr(self, f.name) is not None} | self.other

    def rerank_policy(self, where=PIPELINE_FILE) -> RerankPolicy:
        """The version's policy; BrokenFile naming `where` (the file it was read from) when it is not one. Read where it is
        used, not by read_pipeline: listing, pruning and tracing a version need only its pins."""
        try:
            return RerankPolicy.from_dict(self.policy)
        except (TypeError, ValueError, AttributeError) as e:  # hand-edited: a field of the wrong type, not an object
            raise BrokenFile(f"{where}: its policy is not a rerank policy: {e}") from None

    # read as the dict it was before: the model.py of a version exported earlier (each version keeps its own, and a
    # derived version copies its parent's) does `spec["bi_encoder_version"]` on what read_pipeline returns
    def __getitem__(self, key):
        return self.to_dict()[key]

    def get(self, key, default=None):
        return self.to_dict().get(key, default)

    def __contains__(self, key) -> bool:
        return key in self.to_dict()


def read_pipeline(classifier_dir) -> PipelineSpec:
    """BrokenFile (a ValueError naming the file) when it is not a JSON object pinning both encoder versions; OSError
    when it cannot be read."""
    path = Path(classifier_dir) / PIPELINE_FILE
    text = path.read_text()
    try:
        return PipelineSpec.from_dict(json.loads(text))
    except ValueError as e:  # JSONDecodeError is one too
        raise BrokenFile(f"{path}: {e}") from None


def source_run(repo, version: int) -> Path:
    """The training run behind a classifier version: its own source_run, or its parent's."""
    spec = read_pipeline(version_dir(repo, contract.CLASSIFIER, version))
    while spec.source_run is None and spec.parent:
        spec = read_pipeline(version_dir(repo, contract.CLASSIFIER, spec.parent))
    if spec.source_run is None:
        raise FileNotFoundError(f"{contract.CLASSIFIER} {version} records no source run, nor do its parents "
                                f"(`feedback train` takes one with --replay-run)")
    return Path(spec.source_run)


def write_pipeline(classifier_dir, spec: PipelineSpec) -> None:
    (Path(classifier_dir) / PIPELINE_FILE).write_text(json.dumps(spec.to_dict(), indent=1) + "\n")


def utc_stamp() -> str:
    """The time stamps of the repository's records (pipeline.json "created", promotions.jsonl "at"): UTC, seconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def load_label_index(repo, classifier_dir) -> LabelIndex:
    """The label index of a classifier version, checked against the bi-encoder version it pins."""
    spec = read_pipeline(classifier_dir)
    bi_dir = version_dir(repo, contract.BI_ENCODER, spec.bi_encoder_version)
    encoder_id = (bi_dir / ENCODER_ID_FILE).read_text().strip()
    try:
        return LabelIndex.load(Path(classifier_dir) / LABEL_INDEX_DIR, expect_encoder=encoder_id)
    except IndexMismatch as e:
        raise IndexMismatch(f"{contract.CLASSIFIER} {Path(classifier_dir).name} pins {contract.BI_ENCODER} "
                            f"{spec.bi_encoder_version}: {e}") from None


def load_flat_head(repo, classifier_dir):
    """The flat head of a classifier version, checked against the flat_encoder version it pins (None where it pins none)."""
    spec = read_pipeline(classifier_dir)
    if spec.flat_encoder_version is None:
        return None
    flat_dir = version_dir(repo, contract.FLAT_ENCODER, spec.flat_encoder_version)
    try:
        return FlatHead.load(Path(classifier_dir) / FLAT_HEAD_FILE).check(encoder_id=(flat_dir / ENCODER_ID_FILE).read_text().strip())
    except IndexMismatch as e:
        raise IndexMismatch(f"{contract.CLASSIFIER} {Path(classifier_dir).name} pins {contract.FLAT_ENCODER} "
                            f"{spec.flat_encoder_version}: {e}") from None


def open_classifier(repo, classifier_dir, encoders, **kw) -> TwoStageClassifier:
    """A TwoStageClassifier over one classifier version: its label index (and flat head), its pinned encoders' tokenizers."""
    spec = read_pipeline(classifier_dir)
    bi_dir = version_dir(repo, contract.BI_ENCODER, spec.bi_encoder_version)
    cross_dir = version_dir(repo, contract.CROSS_ENCODER, spec.cross_encoder_version)
    kw = {"top_k": spec.top_k, "threshold": spec.threshold, "policy": spec.rerank_policy(Path(classifier_dir) / PIPELINE_FILE),
          "flat_head": load_flat_head(repo, classifier_dir)} | kw
    return TwoStageClassifier(encoders, load_label_index(repo, classifier_dir),
                              load_tokenizer(bi_dir / TOKENIZER_FILE, DEFAULTS.max_email_tokens),
                              load_tokenizer(cross_dir / TOKENIZER_FILE, DEFAULTS.max_pair_tokens), **kw)


def onnx_encoders_of(repo, spec: PipelineSpec, threads: int = 0, cross_version: int = None):
    """The in-process onnxruntime encoders of the versions a pipeline pins (cross_version: another cross-encoder)."""
    from mailroute.onnx_encoders import OnnxEncoders

    flat = None if spec.flat_encoder_version is None else version_dir(repo, contract.FLAT_ENCODER, spec.flat_encoder_version) / MODEL_FILE
    return OnnxEncoders(version_dir(repo, contract.BI_ENCODER, spec.bi_encoder_version) / MODEL_FILE,
                        version_dir(repo, contract.CROSS_ENCODER, cross_version or spec.cross_encoder_version) / MODEL_FILE, threads, flat)


def open_onnx_classifier(repo, version=None, threads: int = 0, **kw):
    """The in-process ONNX classifier for a repository version: the same files Triton serves."""
    cdir = version_dir(repo, contract.CLASSIFIER, version)
    return open_classifier(repo, cdir, onnx_encoders_of(repo, read_pipeline(cdir), threads), **kw)
