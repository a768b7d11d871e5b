"""config.pbtxt for each model, built as Triton's ModelConfig protobuf from mailroute.contract (the only
place tensor names, dtypes and dims live) and the runtime registry below, then printed as text.

A runtime is one registry entry: what serves an encoder's model.onnx (backend or platform), the
adapter file its version folder needs, its parameters and GPU accelerator. Same names, dtypes and
shapes in every runtime:
  portable - backend python running model.onnx on onnxruntime (servers without the onnxruntime
             backend, e.g. the nvidia-pytriton binary on these machines)
  native   - platform onnxruntime_onnx (NGC container), TensorRT execution provider in fp16 on a GPU
  tensorrt - platform tensorrt_plan: the plans the compose stack's trtexec service builds
"""

from dataclasses import dataclass, field

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from mailroute import contract


@dataclass(frozen=True)
class Runtime:
    backend: str = ""  # Triton backend (python) ...
    platform: str = ""  # ... or platform (onnxruntime_onnx, tensorrt_plan)
    adapter: str = ""  # export/triton/<adapter> copied to each version as model.py ("" = none needed)
    parameters: dict = field(default_factory=dict)
    gpu_accelerator: str = ""  # execution accelerator on KIND_GPU instances
    exported: bool = True  # `mailroute export --runtime` may choose it (tensorrt plans are built later, by trtexec)


RUNTIMES = {
    "portable": Runtime(backend="python", adapter="onnx_encoder.py", parameters={"intra_op_threads": "0"}),
    "native": Runtime(platform="onnxruntime_onnx", gpu_accelerator="tensorrt"),
    "tensorrt": Runtime(platform="tensorrt_plan", exported=False),
}
EXPORT_RUNTIMES = tuple(name for name, r in RUNTIMES.items() if r.exported)


def runtime(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise ValueError(f"runtime must be one of {tuple(RUNTIMES)}, got {name!r}")
    return RUNTIMES[name]


def _dims(t: contract.Tensor, fill: dict) -> list:
    return [int(fill.get(d, d)) for d in t.dims]


def _input(t: contract.Tensor, fill: dict = None):
    return mc.ModelInput(name=t.name, data_type=mc.DataType.Value(t.config_type), dims=_dims(t, fill or {}), optional=t.optional)


def _output(t: contract.Tensor, fill: dict = None):
    return mc.ModelOutput(name=t.name, data_type=mc.DataType.Value(t.config_type), dims=_dims(t, fill or {}))


def _text(cfg: mc.ModelConfig) -> str:
    return text_format.MessageToString(cfg)


def encoder_model_config(name: str, dim: int, runtime_name: str, max_batch: int, instances: int, gpu: bool = False) -> mc.ModelConfig:
    """bi_encoder (ids + mask -> embedding [dim]) or cross_encoder (ids + mask + types -> logit [1])."""
    rt = runtime(runtime_name)
    inputs, output = contract.ENCODER_TENSORS[name]
    kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    cfg = mc.ModelConfig(name=name, backend=rt.backend, platform=rt.platform, max_batch_size=max_batch,
                         input=[_input(t) for t in inputs], output=[_output(output, {contract.EMBEDDING_DIM: dim})],
                         dynamic_batching=mc.ModelDynamicBatching(max_queue_delay_microseconds=500),
                         instance_group=[mc.ModelInstanceGroup(kind=kind, count=instances)])
    cfg.version_policy.all.SetInParent()  # classifier versions pin encoder versions: keep all loadable
    for k, v in rt.parameters.items():
        cfg.parameters[k].string_value = v
    if gpu and rt.gpu_accelerator:
        acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name=rt.gpu_accelerator)
        acc.parameters["precision_mode"] = "FP16"
    return cfg


def encoder_config(name: str, dim: int, runtime_name: str, max_batch: int, instances: int, gpu: bool = False) -> str:
    return _text(encoder_model_config(name, dim, runtime_name, max_batch, instances, gpu))


def classifier_model_config(max_batch: int, instances: int, embed_batch: int, score_batch: int, serving_version: int = None) -> mc.ModelConfig:
    cfg = mc.ModelConfig(name=contract.CLASSIFIER, backend="python", max_batch_size=max_batch,
                         input=[_input(t) for t in contract.CLASSIFIER_INPUT_TENSORS],
                         output=[_output(t) for t in contract.CLASSIFIER_OUTPUT_TENSORS],
                         dynamic_batching=mc.ModelDynamicBatching(max_queue_delay_microseconds=2000),
                         # the BLS model: several instances keep requests flowing while one waits on an encoder
                         instance_group=[mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances)])
    if serving_version is not None:  # the serving version is named (export.versions promotes and rolls back by it)
        cfg.version_policy.specific.versions.append(int(serving_version))
    else:
        cfg.version_policy.latest.num_versions = 1
    cfg.parameters["embed_batch"].string_value = str(embed_batch)
    cfg.parameters["score_batch"].string_value = str(score_batch)
    return cfg


def classifier_config(max_batch: int, instances: int, embed_batch: int, score_batch: int, serving_version: int = None) -> str:
    return _text(classifier_model_config(max_batch, instances, embed_batch, score_batch, serving_version))
