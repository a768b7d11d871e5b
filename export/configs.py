"""config.pbtxt text for each model, from mailroute.contract (the only place tensor names live).

Two runtimes for the encoders, same names, dtypes and shapes:
  native   - platform onnxruntime_onnx (NGC container; TensorRT accelerator optional), or
             tensorrt_plan for the plans that the compose stack's trtexec service builds
  portable - backend python, running the same model.onnx on onnxruntime (servers without the
             onnxruntime backend, e.g. the nvidia-pytriton binary on these machines)
"""

from mailroute import contract

RUNTIMES = ("portable", "native")

_TYPES = {contract.INPUT_IDS: contract.TOKEN_TRITON_TYPE, contract.ATTENTION_MASK: contract.TOKEN_TRITON_TYPE,
          contract.TOKEN_TYPE_IDS: contract.TOKEN_TRITON_TYPE}


def _io(kind: str, name: str, dtype: str, dims: list, optional: bool = False) -> str:
    opt = " optional: true" if optional else ""
    return f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(str(d) for d in dims)} ]{opt} }}'


def _block(kind: str, items: list) -> str:
    return f"{kind} [\n" + ",\n".join(items) + "\n]"


def _params(params: dict) -> str:
    return "\n".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items())


def encoder_config(name: str, dim: int, runtime: str, max_batch: int, instances: int, gpu: bool = False,
                   tensorrt: bool = False) -> str:
    """bi_encoder (inputs ids+mask -> embedding [dim]) or cross_encoder (ids+mask+types -> logit [1])."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    inputs = contract.BI_ENCODER_INPUTS if name == contract.BI_ENCODER else contract.CROSS_ENCODER_INPUTS
    output = (contract.EMBEDDING, [dim]) if name == contract.BI_ENCODER else (contract.LOGIT, [1])
    head = 'backend: "python"' if runtime == "portable" else ('platform: "tensorrt_plan"' if tensorrt else 'platform: "onnxruntime_onnx"')
    lines = [f'name: "{name}"', head, f"max_batch_size: {max_batch}",
             _block("input", [_io("input", n, _TYPES[n], [-1]) for n in inputs]),
             _block("output", [_io("output", output[0], "TYPE_FP32", output[1])]),
             "dynamic_batching { max_queue_delay_microseconds: 500 }",
             f"instance_group [ {{ kind: {'KIND_GPU' if gpu else 'KIND_CPU'} count: {instances} }} ]",
             "version_policy: { all { } }"]  # classifier versions pin encoder versions: keep all loadable
    if runtime == "portable":
        lines.append(_params({"intra_op_threads": 0}))
    elif gpu and not tensorrt:  # onnxruntime with the TensorRT execution provider, fp16
        lines.append('optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt" '
                     'parameters { key: "precision_mode" value: "FP16" } } ] } }')
    return "\n".join(lines) + "\n"


def classifier_config(max_batch: int, instances: int, embed_batch: int, score_batch: int) -> str:
    s, f, b = "TYPE_STRING", "TYPE_FP32", "TYPE_BOOL"
    outputs = [(contract.LABEL, s, [1]), (contract.PROBABILITY, f, [1]), (contract.TOP_LABELS, s, [-1]),
               (contract.TOP_PROBABILITIES, f, [-1]), (contract.NEEDS_REVIEW, b, [1]), (contract.ERROR, s, [1]),
               (contract.MODEL_VERSIONS, s, [3]), (contract.STAGE_MS, f, [len(contract.STAGES)]), (contract.RERANKED, b, [1])]
    lines = [f'name: "{contract.CLASSIFIER}"', 'backend: "python"', f"max_batch_size: {max_batch}",
             _block("input", [_io("input", contract.TEXT, s, [1]), _io("input", contract.SUBJECT, s, [1], optional=True)]),
             _block("output", [_io("output", n, t, d) for n, t, d in outputs]),
             "dynamic_batching { max_queue_delay_microseconds: 2000 }",
             # the BLS model: several instances keep requests flowing while one waits on an encoder
             f"instance_group [ {{ kind: KIND_CPU count: {instances} }} ]",
             "version_policy: { latest { num_versions: 1 } }",
             _params({"embed_batch": embed_batch, "score_batch": score_batch})]
    return "\n".join(lines) + "\n"
