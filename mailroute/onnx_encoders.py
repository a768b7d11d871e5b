"""The encoders on onnxruntime, in-process: what the portable Triton models run, without Triton."""

import os

import numpy as np
import onnxruntime as ort

from mailroute import contract
from mailroute.pipeline import NoFlatClassifier


def session(path, threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or int(os.environ.get("MAILROUTE_ORT_THREADS", "0"))  # 0 = all cores
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=ort.get_available_providers())


class OnnxEncoders:
    """The Encoders seam over the exported graphs. cross_path None: a bi-encoder alone (building a label index with the
    graph that serves), which refuses to score."""

    def __init__(self, bi_path, cross_path=None, threads: int = 0, flat_path=None):
        self.bi = session(bi_path, threads)
        self.cross = None if cross_path is None else session(cross_path, threads)
        self.flat = None if flat_path is None else session(flat_path, threads)

    def embed(self, input_ids, attention_mask):
        return self.bi.run([contract.EMBEDDING], contract.feed(contract.BI_ENCODER, input_ids, attention_mask))[0]

    def flat_embed(self, input_ids, attention_mask):
        if self.flat is None:
            raise NoFlatClassifier()
        return self.flat.run([contract.EMBEDDING], contract.feed(contract.FLAT_ENCODER, input_ids, attention_mask))[0]

    def score(self, input_ids, attention_mask, token_type_ids):
        if self.cross is None:
            raise ValueError("these OnnxEncoders hold a bi-encoder alone: give cross_path to score pairs")
        feed = contract.feed(contract.CROSS_ENCODER, input_ids, attention_mask, token_type_ids)
        return self.cross.run([contract.LOGIT], feed)[0][:, 0].astype(np.float32)
