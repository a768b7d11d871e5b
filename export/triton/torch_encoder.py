"""Triton Python-backend adapter for the *torch* runtime: an encoder in PyTorch (fp16 + CUDA graphs on a
GPU instance, fp32 on a CPU one), from the Hugging Face weights in <encoder>/<v>/pytorch/. Same tensor
names and shapes as every other runtime. Copied to <encoder>/<v>/model.py."""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from mailroute import contract
from mailroute.backend_args import instance_device
from mailroute.pipeline import execute_encoder
from mailroute.repository import TORCH_WEIGHTS_DIR
from mailroute.torch_encoders import BI, CROSS, TorchEncoder


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [i["name"] for i in config["input"]]
        self.output = config["output"][0]["name"]
        device = instance_device(args)
        folder = Path(args["model_repository"]) / args["model_version"] / TORCH_WEIGHTS_DIR
        # CUDA graphs are captured here, before the model reports ready: the first request finds them warm
        self.encoder = TorchEncoder(folder, BI if self.output == contract.EMBEDDING else CROSS, device,
                                    max_batch=int(config["max_batch_size"]))
        pb_utils.Logger.log_info(f"{config['name']} v{args['model_version']}: torch on {device}, {len(self.encoder.graphs)} CUDA graphs")

    def execute(self, requests):
        return execute_encoder(pb_utils, requests, self.inputs, self.output, self.encoder)
