"""config.pbtxt for each model, built as Triton's ModelConfig protobuf from mailroute.contract (the only
place tensor names, dtypes and dims live) and the runtime registry (export/runtimes.py, re-exported here),
then printed as text; and the shape profiles docker/build_tensorrt.sh passes to trtexec, rendered from the
same declarations. Same names, dtypes and shapes in every runtime.

Throughput settings (per export): instances, preferred batch sizes, the queue delay, and a queue
limit: a request arriving at a full queue is refused at once (UNAVAILABLE, "exceeds maximum queue
size") instead of waiting behind an overload.
"""

from dataclasses import dataclass

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from mailroute import contract
from mailroute.settings import DEFAULTS
from export.runtimes import EXPORT_RUNTIMES, RUNTIMES, TRT_ENGINE_CACHE, Runtime, runtime  # noqa: F401 (the registry, re-exported)

ENCODER_LIMITS = contract.ENCODER_LIMITS  # per encoder: (most rows in one call, most tokens in a row), declared there


@dataclass(frozen=True)
class Throughput:
    instances: int = 1
    preferred_batch_sizes: tuple = ()  # () = Triton batches whatever is queued
    max_queue_delay_us: int = DEFAULTS.max_queue_delay_us  # how long a request may wait for others to batch with
    max_queue_size: int = 0  # 0 = unbounded; else requests beyond it are refused at once

    def apply(self, cfg: mc.ModelConfig) -> None:
        cfg.dynamic_batching.max_queue_delay_microseconds = self.max_queue_delay_us
        cfg.dynamic_batching.preferred_batch_size.extend(int(b) for b in self.preferred_batch_sizes if 0 < int(b) <= cfg.max_batch_size)
        if self.max_queue_size:
            cfg.dynamic_batching.default_queue_policy.max_queue_size = self.max_queue_size


CLASSIFIER_DELAY_FACTOR = DEFAULTS.classifier_delay_factor  # the BLS classifier batches whole emails: it waits longer


def _dims(t: contract.Tensor, fill: dict) -> list:
    return [int(fill.get(d, d)) for d in t.dims]


def _input(t: contract.Tensor, fill: dict = None):
    return mc.ModelInput(name=t.name, data_type=mc.DataType.Value(t.config_type), dims=_dims(t, fill or {}), optional=t.optional)


def _output(t: contract.Tensor, fill: dict = None):
    return mc.ModelOutput(name=t.name, data_type=mc.DataType.Value(t.config_type), dims=_dims(t, fill or {}))


def _text(cfg: mc.ModelConfig) -> str:
    return text_format.MessageToString(cfg)


def encoder_model_config(name: str, dim: int, runtime_name: str, max_batch: int, instances: int = 1, gpu: bool = False,
                         throughput: Throughput = None) -> mc.ModelConfig:
    """bi_encoder (ids + mask -> embedding [dim]) or cross_encoder (ids + mask + types -> logit [1])."""
    rt = runtime(runtime_name)
    throughput = throughput or Throughput(instances=instances)
    inputs, output = contract.ENCODER_TENSORS[name]
    kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    cfg = mc.ModelConfig(name=name, backend=rt.backend, platform=rt.platform, max_batch_size=max_batch,
                         input=[_input(t) for t in inputs], output=[_output(output, {contract.EMBEDDING_DIM: dim})],
                         instance_group=[mc.ModelInstanceGroup(kind=kind, count=throughput.instances)])
    throughput.apply(cfg)
    cfg.version_policy.all.SetInParent()  # classifier versions pin encoder versions: keep all loadable
    cfg.parameters[contract.RUNTIME_PARAMETER].string_value = runtime_name  # two runtimes share the python backend: say which
    for k, v in rt.parameters.items():
        cfg.parameters[k].string_value = v
    if gpu and rt.gpu_accelerator:
        acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name=rt.gpu_accelerator["name"])
        for k, v in rt.gpu_accelerator.items():
            if k != "name":
                acc.parameters[k] = v
    if rt.platform:  # a native engine's first requests pay its set-up: warm it before the model reports ready
        warm = cfg.model_warmup.add(name="short_email", batch_size=1)
        for t in inputs:
            warm.inputs[t.name].data_type = mc.DataType.Value(t.config_type)
            warm.inputs[t.name].dims.append(16)
            warm.inputs[t.name].zero_data = True
    return cfg


def encoder_config(name: str, dim: int, runtime_name: str, max_batch: int, instances: int = 1, gpu: bool = False,
                   throughput: Throughput = None) -> str:
    return _text(encoder_model_config(name, dim, runtime_name, max_batch, instances, gpu, throughput))


def trtexec_shapes(name: str) -> str:
    """trtexec's shape-profile flags for an encoder, one a line (docker/build_tensorrt.sh passes them on as they are):
    every input the contract declares, batch x its dims with the token budget for any length. From 1 x 1 (a batch is
    padded to its longest row, so a 3-token email alone must fit) up to, and tuned for, a full batch of full rows."""
    max_batch, max_tokens = ENCODER_LIMITS[name]
    inputs, _ = contract.ENCODER_TENSORS[name]

    def shapes(batch: int, tokens: int) -> str:
        return ",".join(f"{t.name}:" + "x".join(str(tokens if d == -1 else d) for d in (batch, *t.dims)) for t in inputs)

    return "".join(f"--{kind}Shapes={shapes(*size)}\n" for kind, size in
                   (("min", (1, 1)), ("opt", (max_batch, max_tokens)), ("max", (max_batch, max_tokens))))


def classifier_model_config(max_batch: int, instances: int, embed_batch: int, score_batch: int, serving_version: int = None,
                            throughput: Throughput = None, search_device: str = "", encoders_in_process: bool = False,
                            gpu: bool = False) -> mc.ModelConfig:
    """encoders_in_process: each instance runs the encoders (the torch runtime's weights of the versions it pins)
    instead of calling the encoder models by BLS; with gpu its instances are KIND_GPU, one device each."""
    throughput = throughput or Throughput(instances=instances, max_queue_delay_us=CLASSIFIER_DELAY_FACTOR * Throughput.max_queue_delay_us)
    kind = mc.ModelInstanceGroup.KIND_GPU if encoders_in_process and gpu else mc.ModelInstanceGroup.KIND_CPU
    cfg = mc.ModelConfig(name=contract.CLASSIFIER, backend="python", max_batch_size=max_batch,
                         input=[_input(t) for t in contract.CLASSIFIER_INPUT_TENSORS],
                         output=[_output(t) for t in contract.CLASSIFIER_OUTPUT_TENSORS],
                         # the BLS model: several instances keep requests flowing while one waits on an encoder
                         instance_group=[mc.ModelInstanceGroup(kind=kind, count=throughput.instances)])
    throughput.apply(cfg)
    if serving_version is not None:  # the serving version is named (export.versions promotes and rolls back by it)
        cfg.version_policy.specific.versions.append(int(serving_version))
    else:
        cfg.version_policy.latest.num_versions = 1
    cfg.parameters[contract.EMBED_BATCH_PARAMETER].string_value = str(embed_batch)
    cfg.parameters[contract.SCORE_BATCH_PARAMETER].string_value = str(score_batch)
    if search_device:  # label search by torch on this device (LabelIndex.on_device: TorchFlatIP, TorchExemplarIndex)
        cfg.parameters[contract.SEARCH_DEVICE_PARAMETER].string_value = search_device
    if encoders_in_process:
        cfg.parameters[contract.ENCODERS_PARAMETER].string_value = contract.ENCODERS_IN_PROCESS
    return cfg


def classifier_config(max_batch: int, instances: int, embed_batch: int, score_batch: int, serving_version: int = None,
                      throughput: Throughput = None, search_device: str = "", encoders_in_process: bool = False, gpu: bool = False) -> str:
    return _text(classifier_model_config(max_batch, instances, embed_batch, score_batch, serving_version, throughput, search_device,
                                         encoders_in_process, gpu))


def runtime_of(cfg: mc.ModelConfig) -> str:
    """The registry name of the runtime a parsed config runs (None when no entry matches)."""
    if contract.RUNTIME_PARAMETER in cfg.parameters:
        return cfg.parameters[contract.RUNTIME_PARAMETER].string_value
    # configs written before the parameter: the first registry entry with their backend/platform (the python
    # backend could only be portable then, and portable precedes torch in RUNTIMES)
    return next((name for name, r in RUNTIMES.items() if (r.backend, r.platform) == (cfg.backend, cfg.platform)), None)
