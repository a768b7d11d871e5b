"""Triton Python-backend adapter for `email_classifier` (copied to email_classifier/<v>/model.py).

Thin on purpose: requests -> mailroute.service.ClassifierService -> responses. The encoders are BLS
calls to the bi_encoder / cross_encoder (/ flat_encoder) versions that this classifier version pins, so they run on
whichever backend serves them (portable onnxruntime here, native onnxruntime / TensorRT in production).
With the torch runtime, an export may put them in the classifier's own process instead (its config's
"encoders" parameter, `mailroute export --encoders-in-classifier`): the same versions' PyTorch weights, no
BLS hop per stage, on the instance's device.
"""

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from mailroute import contract
from mailroute.backend_args import config_parameters, instance_device
from mailroute.pipeline import NoFlatClassifier
from mailroute.repository import open_classifier, read_pipeline
from mailroute.service import ERROR_KINDS, ClassifierService, EncoderUnavailable, Request, RequestError, server_fault
from mailroute.settings import DEFAULTS


# encoders on GPU instances answer in GPU memory unless asked otherwise; the pipeline reads them with numpy
_CPU = {"preferred_memory": pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)} if hasattr(pb_utils, "PreferredMemory") else {}


def _infer(model: str, version: int, inputs: dict, output: str) -> np.ndarray:
    """One BLS call: exec, check the error of this very response, return the named output."""
    request = pb_utils.InferenceRequest(model_name=model, model_version=version, requested_output_names=[output],
                                        inputs=[pb_utils.Tensor(name, value) for name, value in inputs.items()], **_CPU)
    response = request.exec()
    if response.has_error():
        raise EncoderUnavailable(f"{model} v{version}: {response.error().message()}")
    return pb_utils.get_output_tensor_by_name(response, output).as_numpy()


class BLSEncoders:
    def __init__(self, bi_version: int, cross_version: int, flat_version: int = None):
        self.bi_version, self.cross_version, self.flat_version = bi_version, cross_version, flat_version

    def embed(self, input_ids, attention_mask):
        return _infer(contract.BI_ENCODER, self.bi_version, contract.feed(contract.BI_ENCODER, input_ids, attention_mask),
                      contract.EMBEDDING)

    def flat_embed(self, input_ids, attention_mask):
        if self.flat_version is None:
            raise NoFlatClassifier(f"the encoders this {contract.CLASSIFIER} version pins")
        return _infer(contract.FLAT_ENCODER, self.flat_version, contract.feed(contract.FLAT_ENCODER, input_ids, attention_mask),
                      contract.EMBEDDING)

    def score(self, input_ids, attention_mask, token_type_ids):
        feed = contract.feed(contract.CROSS_ENCODER, input_ids, attention_mask, token_type_ids)
        return _infer(contract.CROSS_ENCODER, self.cross_version, feed, contract.LOGIT)[:, 0]


def _input(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


class ClassifierMetrics:
    """Python-backend custom metrics on Triton's Prometheus endpoint (names in mailroute.contract),
    labelled with the classifier version."""

    def __init__(self, version: str):
        v = {"version": str(version)}
        self._families = []  # a MetricFamily must outlive its Metric objects: keep them all
        hist = pb_utils.MetricFamily(name=contract.METRIC_STAGE_MS, description="milliseconds per pipeline stage, per server batch",
                                     kind=pb_utils.MetricFamily.HISTOGRAM)
        self._families.append(hist)
        self.stage = {s: hist.Metric(labels=v | {"stage": s}, buckets=list(contract.STAGE_MS_BUCKETS)) for s in contract.STAGES}

        def counter(name, description):
            family = pb_utils.MetricFamily(name=name, description=description, kind=pb_utils.MetricFamily.COUNTER)
            self._families.append(family)
            return family

        self.emails = counter(contract.METRIC_EMAILS, "emails classified").Metric(labels=v)
        self.reranked = counter(contract.METRIC_RERANKED, "emails whose candidates the cross-encoder reranked").Metric(labels=v)
        self.review = counter(contract.METRIC_NEEDS_REVIEW, "emails below their probability threshold").Metric(labels=v)
        self._errors_family = counter(contract.METRIC_ROW_ERRORS, "emails that could not be classified, by kind")
        self._errors, self._v = {}, v

    def record(self, results: list) -> None:
        stage_ms, n, reranked, review = None, 0, 0, 0
        for res in results:
            if isinstance(res, RequestError):
                continue
            ok = res[contract.ERROR][:, 0] == b""
            n += int(ok.sum())
            reranked += int(res[contract.RERANKED][ok, 0].sum())
            review += int(res[contract.NEEDS_REVIEW][ok, 0].sum())
            for kind in res.get(ERROR_KINDS, []):
                if kind not in self._errors:
                    self._errors[kind] = self._errors_family.Metric(labels=self._v | {"kind": kind})
                self._errors[kind].increment(1)
            if ok.any():
                stage_ms = res[contract.STAGE_MS][ok][0]  # one batch: every row carries the batch's timings
        self.emails.increment(n)
        self.reranked.increment(reranked)
        self.review.increment(review)
        if stage_ms is not None:
            for s, ms in zip(contract.STAGES, stage_ms):
                self.stage[s].observe(float(ms))


class TritonPythonModel:
    def initialize(self, args):
        here = Path(args["model_repository"]) / args["model_version"]
        repo = Path(args["model_repository"]).parent
        spec = read_pipeline(here)
        bi_v, cross_v, flat_v = spec.bi_encoder_version, spec.cross_encoder_version, spec.flat_encoder_version
        params = config_parameters(args)
        # the downstream models' max_batch_size bounds each BLS call
        embed_batch = int(params.get(contract.EMBED_BATCH_PARAMETER, DEFAULTS.embed_batch))
        score_batch = int(params.get(contract.SCORE_BATCH_PARAMETER, DEFAULTS.score_batch))
        if params.get(contract.ENCODERS_PARAMETER) == contract.ENCODERS_IN_PROCESS:  # torch runtime, no BLS hop per stage
            from mailroute.torch_encoders import TorchEncoders

            device = instance_device(args)
            encoders = TorchEncoders.of_versions(repo, bi_v, cross_v, device, flat_version=flat_v, embed_batch=embed_batch,
                                                 score_batch=score_batch)
            where = f"in this process on {device}"
        else:
            encoders, where = BLSEncoders(bi_v, cross_v, flat_v), "by BLS"
        clf = open_classifier(repo, here, encoders, embed_batch=embed_batch, score_batch=score_batch)
        if params.get(contract.SEARCH_DEVICE_PARAMETER):  # the torch runtime's label search (where faiss-gpu is not installed)
            clf.index = clf.index.on_device(params[contract.SEARCH_DEVICE_PARAMETER])
        versions = {contract.CLASSIFIER: args["model_version"]} | spec.pins()
        self.service = ClassifierService(clf, tuple(versions.get(m, "") for m in contract.VERSION_MODELS))
        self.metrics = ClassifierMetrics(args["model_version"])
        pb_utils.Logger.log_info(f"{contract.CLASSIFIER} v{args['model_version']}: {len(clf.label_names)} labels, encoders {where}, "
                                 f"{contract.BI_ENCODER} v{bi_v}, {contract.CROSS_ENCODER} v{cross_v}"
                                 + ("" if flat_v is None else f", {contract.FLAT_ENCODER} v{flat_v}"))

    def execute(self, requests):
        batch = [Request(_input(r, contract.TEXT), _input(r, contract.SUBJECT), r.parameters()) for r in requests]
        try:
            results = self.service.handle(batch)
        except Exception as e:  # every request of this batch learns why, the model keeps serving
            message, retryable = server_fault(e)  # an encoder being recovered: UNAVAILABLE (retried); else INTERNAL
            pb_utils.Logger.log_error(f"{contract.CLASSIFIER}: {message}")
            err = pb_utils.TritonError(message, pb_utils.TritonError.UNAVAILABLE if retryable else pb_utils.TritonError.INTERNAL)
            return [pb_utils.InferenceResponse(error=err) for _ in requests]
        try:
            self.metrics.record(results)
        except Exception as e:  # metrics never cost a caller its answer
            pb_utils.Logger.log_warn(f"{contract.CLASSIFIER}: metrics not recorded: {e}")
        responses = []
        for res in results:
            if isinstance(res, RequestError):  # the caller's mistake: INVALID_ARGUMENT, never retried
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(res), pb_utils.TritonError.INVALID_ARG)))
            else:
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, res[k]) for k in contract.CLASSIFIER_OUTPUTS]))
        return responses
