"""Triton Python-backend adapter that runs an ONNX encoder on onnxruntime: the *portable* runtime for
servers without the onnxruntime backend (the nvidia-pytriton binary). Same tensor names and shapes as
the native `onnxruntime_onnx` model it stands in for. Copied to <encoder>/<v>/model.py."""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from mailroute import contract
from mailroute.backend_args import config_parameters
from mailroute.onnx_encoders import session
from mailroute.pipeline import execute_encoder
from mailroute.repository import MODEL_FILE


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [i["name"] for i in config["input"]]
        self.output = config["output"][0]["name"]
        params = config_parameters(args)
        path = Path(args["model_repository"]) / args["model_version"] / MODEL_FILE
        self.session = session(path, int(params.get(contract.INTRA_OP_THREADS_PARAMETER, contract.INTRA_OP_THREADS_DEFAULT)))

    def execute(self, requests):
        return execute_encoder(pb_utils, requests, self.inputs, self.output, lambda batch: self.session.run([self.output], batch)[0])
