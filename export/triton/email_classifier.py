"""Triton Python-backend adapter for `email_classifier` (copied to email_classifier/<v>/model.py).

Thin on purpose: requests -> mailroute.service.ClassifierService -> responses. The encoders are BLS
calls to the bi_encoder / cross_encoder versions that this classifier version pins, so they run on
whichever backend serves them (portable onnxruntime here, native onnxruntime / TensorRT in production).
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from mailroute import contract
from mailroute.repository import open_classifier, read_pipeline
from mailroute.service import ClassifierService, Request, RequestError


def _infer(model: str, version: int, inputs: dict, output: str) -> np.ndarray:
    """One BLS call: exec, check the error of this very response, return the named output."""
    request = pb_utils.InferenceRequest(model_name=model, model_version=version, requested_output_names=[output],
                                        inputs=[pb_utils.Tensor(name, value) for name, value in inputs.items()])
    response = request.exec()
    if response.has_error():
        raise RuntimeError(f"{model} v{version}: {response.error().message()}")
    return pb_utils.get_output_tensor_by_name(response, output).as_numpy()


class BLSEncoders:
    def __init__(self, bi_version: int, cross_version: int):
        self.bi_version, self.cross_version = bi_version, cross_version

    def embed(self, input_ids, attention_mask):
        return _infer(contract.BI_ENCODER, self.bi_version,
                      {contract.INPUT_IDS: input_ids, contract.ATTENTION_MASK: attention_mask}, contract.EMBEDDING)

    def score(self, input_ids, attention_mask, token_type_ids):
        feed = {contract.INPUT_IDS: input_ids, contract.ATTENTION_MASK: attention_mask, contract.TOKEN_TYPE_IDS: token_type_ids}
        return _infer(contract.CROSS_ENCODER, self.cross_version, feed, contract.LOGIT)[:, 0]


def _input(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


class TritonPythonModel:
    def initialize(self, args):
        here = Path(args["model_repository"]) / args["model_version"]
        repo = Path(args["model_repository"]).parent
        spec = read_pipeline(here)
        bi_v, cross_v = int(spec["bi_encoder_version"]), int(spec["cross_encoder_version"])
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        # the downstream models' max_batch_size bounds each BLS call
        clf = open_classifier(repo, here, BLSEncoders(bi_v, cross_v), embed_batch=int(params.get("embed_batch", 64)),
                              score_batch=int(params.get("score_batch", 256)))
        self.service = ClassifierService(clf, (args["model_version"], bi_v, cross_v))
        pb_utils.Logger.log_info(f"{contract.CLASSIFIER} v{args['model_version']}: {len(clf.label_names)} labels, "
                                 f"{contract.BI_ENCODER} v{bi_v}, {contract.CROSS_ENCODER} v{cross_v}")

    def execute(self, requests):
        batch = [Request(_input(r, contract.TEXT), _input(r, contract.SUBJECT), r.parameters()) for r in requests]
        try:
            results = self.service.handle(batch)
        except Exception as e:  # an encoder failed: every request of this batch learns why, the model keeps serving
            pb_utils.Logger.log_error(f"{contract.CLASSIFIER}: {e}")
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"classification failed: {e}")) for _ in requests]
        responses = []
        for res in results:
            if isinstance(res, RequestError):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(res))))
            else:
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in res.items()]))
        return responses
