"""Triton Python-backend adapter that runs an ONNX encoder on onnxruntime: the *portable* runtime for
servers without the onnxruntime backend (the nvidia-pytriton binary). Same tensor names and shapes as
the native `onnxruntime_onnx` model it stands in for. Copied to <encoder>/<v>/model.py."""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from mailroute.onnx_encoders import session
from mailroute.pipeline import pad_stack


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [i["name"] for i in config["input"]]
        self.output = config["output"][0]["name"]
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = session(path, int(params.get("intra_op_threads", "0")))

    def execute(self, requests):
        feeds = [[pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs] for r in requests]
        sizes = [f[0].shape[0] for f in feeds]
        try:
            batch = {n: pad_stack([f[j] for f in feeds]) for j, n in enumerate(self.inputs)}
            out = self.session.run([self.output], batch)[0]
        except Exception as e:  # e.g. wrong shapes: answer every request with the reason, keep serving
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.output}: {e}")) for _ in requests]
        responses, start = [], 0
        for n in sizes:
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output, out[start:start + n])]))
            start += n
        return responses
