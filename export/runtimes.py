"""The encoder runtime registry: a runtime is one entry here. Light (no protobuf, no torch): the CLI renders
`mailroute export --runtime`'s help from it; export/configs.py renders the configs from it.

An entry says what serves an encoder (backend or platform), the adapter file its version folder needs, its
parameters, GPU accelerator and whether its graph may carry onnxruntime's fused operators, plus one line for
the help. Every runtime serves the same names, dtypes and shapes (mailroute.contract).
"""

from dataclasses import dataclass, field
from pathlib import Path

from mailroute import contract

# the Python-backend adapters (thin model.py files over mailroute's classes), copied into each version that needs one
ADAPTERS_DIR = Path(__file__).resolve().parent / "triton"
CLASSIFIER_ADAPTER = "email_classifier.py"  # every email_classifier version's model.py


@dataclass(frozen=True)
class Runtime:
    summary: str  # one line: what serves the encoder, and where (the --runtime help lists these)
    backend: str = ""  # Triton backend (python) ...
    platform: str = ""  # ... or platform (onnxruntime_onnx, tensorrt_plan)
    adapter: str = ""  # export/triton/<adapter> copied to each version as model.py ("" = none needed)
    parameters: dict = field(default_factory=dict)
    gpu_accelerator: dict = field(default_factory=dict)  # execution accelerator on KIND_GPU instances: name + parameters
    fused_graph: bool = True  # model.onnx may hold onnxruntime's fused transformer operators
    torch_weights: bool = False  # the version folder carries the Hugging Face weights (pytorch/) it runs
    gpu_label_search: str = ""  # with --gpu, the classifier's label search runs by torch on this device ("" = the index's own FAISS search: on the GPU where faiss-gpu is installed, else the CPU)
    exported: bool = True  # `mailroute export --runtime` may choose it (tensorrt plans are built later, by trtexec)


# where the TensorRT execution provider keeps its engines, inside the serving container: docker-compose.yml mounts
# a named volume there, so an engine is built once per version and card, not at every start
TRT_ENGINE_CACHE = "/trt_engine_cache"
# the runtime of the plans docker/build_tensorrt.sh builds after an export (not exported itself): every export renders
# its encoders' configs/tensorrt.pbtxt with it (mailroute.repository.TENSORRT_CONFIG)
TENSORRT = "tensorrt"

RUNTIMES = {
    "portable": Runtime("Python backend running model.onnx (fused graph) on onnxruntime: servers without the onnxruntime "
                        "backend, e.g. the nvidia-pytriton tritonserver", backend="python", adapter="onnx_encoder.py",
                        parameters={contract.INTRA_OP_THREADS_PARAMETER: contract.INTRA_OP_THREADS_DEFAULT}),
    # plain graph: TensorRT's parser knows no com.microsoft fused ops
    "native": Runtime("onnxruntime_onnx platform (NGC container), plain graph; on --gpu the TensorRT execution provider in fp16 "
                      "with an engine cache", platform="onnxruntime_onnx", fused_graph=False, gpu_accelerator={
                          "name": "tensorrt", "precision_mode": "FP16", "trt_engine_cache_enable": "1",
                          "trt_engine_cache_path": TRT_ENGINE_CACHE}),
    TENSORRT: Runtime("tensorrt_plan platform, configs/tensorrt.pbtxt: plans docker/build_tensorrt.sh builds from the plain "
                      "model.onnx of a native export", platform="tensorrt_plan", fused_graph=False, exported=False),
    # no faiss-gpu on the GPU machines it is for: label search by torch there (TorchFlatIP, TorchExemplarIndex)
    "torch": Runtime("Python backend running the PyTorch weights in pytorch/ (fp16 + CUDA graphs on a GPU, fp32 on a CPU): "
                     "GPU machines without onnxruntime-gpu or TensorRT", backend="python", adapter="torch_encoder.py",
                     torch_weights=True, gpu_label_search="cuda"),
}
EXPORT_RUNTIMES = tuple(name for name, r in RUNTIMES.items() if r.exported)
DEFAULT_RUNTIME = "portable"  # runs on any tritonserver with the Python backend (this machine's included)


def runtime(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise ValueError(f"runtime must be one of {tuple(RUNTIMES)}, got {name!r}")
    return RUNTIMES[name]


def runtime_help() -> str:
    """`mailroute export --runtime`'s help: every registry entry with its summary, the ones an export may not choose apart."""
    def listing(exported):
        return "; ".join(f"{name} = {r.summary}" for name, r in RUNTIMES.items() if r.exported == exported)

    later = listing(False)
    return f"encoder runtime, one of: {listing(True)}" + (f". Not exported, made afterwards: {later}" if later else "")
