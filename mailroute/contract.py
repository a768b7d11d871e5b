"""The one source of truth for model names and tensor names, dtypes and shapes.

Each tensor is declared once, as a `Tensor` (name, numpy dtype, dims per row): export/configs.py renders
them into every config.pbtxt through Triton's ModelConfig protobuf, export/onnx_export.py names the graph
inputs and outputs after them, the service builds its output arrays with their dtypes and the client its
inputs with their wire types. Token ids are int64 everywhere: onnxruntime takes them as exported, and
TensorRT 10 (the 24.10 container) builds plans with int64 I/O, so no caller ever sees another dtype.
"""

from dataclasses import dataclass

import numpy as np

from mailroute.settings import DEFAULTS

# Triton's names for numpy dtypes: config data_type (TYPE_*) and wire datatype (tritonclient, HTTP/JSON)
_TRITON_TYPES = {np.dtype(np.int64): ("TYPE_INT64", "INT64"), np.dtype(np.float32): ("TYPE_FP32", "FP32"),
                 np.dtype(bool): ("TYPE_BOOL", "BOOL"), np.dtype(object): ("TYPE_STRING", "BYTES")}
EMBEDDING_DIM = "embedding_dim"  # a dims entry filled at export with the bi-encoder's width (384 for MiniLM)


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: type  # numpy dtype; object = UTF-8 strings (bytes)
    dims: tuple  # per row, without the batch dimension; -1 = any length
    optional: bool = False

    @property
    def config_type(self) -> str:
        return _TRITON_TYPES[np.dtype(self.dtype)][0]

    @property
    def wire_type(self) -> str:
        return _TRITON_TYPES[np.dtype(self.dtype)][1]

# model names inside the Triton repository
BI_ENCODER = "bi_encoder"
CROSS_ENCODER = "cross_encoder"
CLASSIFIER = "email_classifier"
# the flat classifier's encoder (mailroute.flat_head): the bi-encoder's tensors; a classifier version pins one where its
# policy fuses the flat classifier, and a repository exported from a run without one has no such model
FLAT_ENCODER = "flat_encoder"
ENCODERS = (BI_ENCODER, CROSS_ENCODER, FLAT_ENCODER)
MODELS = (CLASSIFIER, BI_ENCODER, CROSS_ENCODER)  # the models every repository has
# the order of the MODEL_VERSIONS output ("" = not pinned). MODELS first: the model.py of a version exported before the
# flat encoder answers those three, and the service fills the rest with ""
VERSION_MODELS = MODELS + (FLAT_ENCODER,)  # also the versions a feedback-store prediction row keeps
# per encoder: the most rows in one call (its config's max_batch_size: the rows the classifier sends in one BLS call, or
# to its in-process encoders) and the most tokens in a row (the tokenizer's budget: every caller truncates to it)
ENCODER_LIMITS = {BI_ENCODER: (DEFAULTS.embed_batch, DEFAULTS.max_email_tokens),
                  CROSS_ENCODER: (DEFAULTS.score_batch, DEFAULTS.max_pair_tokens)}
ENCODER_LIMITS[FLAT_ENCODER] = ENCODER_LIMITS[BI_ENCODER]  # called with the bi-encoder's inputs, in its batches
# Triton's restricted protocol key for model load/unload/config (`mailroute serve --admin-key`): the server is
# started with <groups>:ADMIN_KEY=<secret>; a gRPC caller sends it as a header with Triton's gRPC prefix
ADMIN_KEY = "admin-key"
ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_KEY}"
CLASSIFIER_MAX_BATCH = 64  # emails per email_classifier server batch (its config's max_batch_size; the client's default batch)
# every encoder config's parameter naming its runtime (export/runtimes.py RUNTIMES): two runtimes share the python backend
RUNTIME_PARAMETER = "runtime"
# the classifier's config parameter "encoders" = this: each instance runs the encoders itself (torch runtime), no BLS
ENCODERS_PARAMETER, ENCODERS_IN_PROCESS = "encoders", "in_process"
# the classifier's other config parameters (export/configs.py writes them, export/triton/email_classifier.py reads them)
EMBED_BATCH_PARAMETER = "embed_batch"  # emails per bi-encoder (and flat-encoder) call inside one classifier batch
SCORE_BATCH_PARAMETER = "score_batch"  # (email, label) pairs per cross-encoder call
SEARCH_DEVICE_PARAMETER = "search_device"  # label search by torch on this device (absent: the index's own, faiss)
# an encoder's config parameter under the portable runtime (export/runtimes.py writes it, export/triton/onnx_encoder.py
# reads it): onnxruntime's intra-op threads per instance; "0" = $MAILROUTE_ORT_THREADS where set, else onnxruntime's own
# choice (every core)
INTRA_OP_THREADS_PARAMETER, INTRA_OP_THREADS_DEFAULT = "intra_op_threads", "0"

# encoder tensors (every encoder; the flat encoder has the bi-encoder's)
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
TOKEN_TYPE_IDS = "token_type_ids"
EMBEDDING = "embedding"  # bi-encoder output: (batch, dim), mean pooled and L2 normalised
LOGIT = "logit"  # cross-encoder output: (batch, 1), raw score, no sigmoid
TOKEN_DTYPE = np.int64

BI_ENCODER_INPUTS = (INPUT_IDS, ATTENTION_MASK)
CROSS_ENCODER_INPUTS = (INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS)
ENCODER_TENSORS = {  # per encoder: (inputs, output)
    BI_ENCODER: ([Tensor(n, TOKEN_DTYPE, (-1,)) for n in BI_ENCODER_INPUTS], Tensor(EMBEDDING, np.float32, (EMBEDDING_DIM,))),
    CROSS_ENCODER: ([Tensor(n, TOKEN_DTYPE, (-1,)) for n in CROSS_ENCODER_INPUTS], Tensor(LOGIT, np.float32, (1,))),
}
ENCODER_TENSORS[FLAT_ENCODER] = ENCODER_TENSORS[BI_ENCODER]  # the same encoder shape, another training objective


def feed(model: str, *arrays) -> dict:
    """An encoder's inputs by name, in its declared order: feed(BI_ENCODER, ids, mask) -> {"input_ids": ids, ...}."""
    names = [t.name for t in ENCODER_TENSORS[model][0]]
    if len(arrays) != len(names):
        raise TypeError(f"{model} takes {len(names)} inputs ({', '.join(names)}), got {len(arrays)}")
    return dict(zip(names, arrays))

# classifier interface (what callers use)
TEXT = "TEXT"  # string, (batch, 1)
SUBJECT = "SUBJECT"  # optional string, (batch, 1)
LABEL = "LABEL"  # string, (batch, 1)
PROBABILITY = "PROBABILITY"  # fp32, (batch, 1)
TOP_LABELS = "TOP_LABELS"  # string, (batch, K)
TOP_PROBABILITIES = "TOP_PROBABILITIES"  # fp32, (batch, K)
NEEDS_REVIEW = "NEEDS_REVIEW"  # bool, (batch, 1)
ERROR = "ERROR"  # string, (batch, 1): empty when the row was classified, else why not
MODEL_VERSIONS = "MODEL_VERSIONS"  # string, (batch, 4): the versions of VERSION_MODELS, in that order ("" = not pinned)
# fp32, (batch, 5): milliseconds each stage (STAGES) took for the server batch this row was part of. Per
# batch, not per row: one Triton batch merges several requests, so rows of a batch share these values
# and summing them over rows overcounts. Per-stage histograms are on the Prometheus endpoint (METRIC_*).
STAGE_MS = "STAGE_MS"
RERANKED = "RERANKED"  # bool, (batch, 1): stage 2 ran for this email (False where the gate found retrieval sure, and always where the
# version's policy gives the cross-encoder no weight)

# "flat": the flat classifier's pass (0 where the version does not fuse it). It runs after "embed" but comes last, so a
# caller that reads the four columns of a version exported before it still reads them under their own names
STAGE_PREPROCESS, STAGE_EMBED, STAGE_SEARCH, STAGE_RERANK, STAGE_FLAT = STAGES = ("preprocess", "embed", "search", "rerank", "flat")
CLASSIFIER_INPUT_TENSORS = (Tensor(TEXT, object, (1,)), Tensor(SUBJECT, object, (1,), optional=True))
CLASSIFIER_OUTPUT_TENSORS = (
    Tensor(LABEL, object, (1,)), Tensor(PROBABILITY, np.float32, (1,)), Tensor(TOP_LABELS, object, (-1,)),
    Tensor(TOP_PROBABILITIES, np.float32, (-1,)), Tensor(NEEDS_REVIEW, bool, (1,)), Tensor(ERROR, object, (1,)),
    Tensor(MODEL_VERSIONS, object, (len(VERSION_MODELS),)), Tensor(STAGE_MS, np.float32, (len(STAGES),)), Tensor(RERANKED, bool, (1,)))
CLASSIFIER_OUTPUTS = tuple(t.name for t in CLASSIFIER_OUTPUT_TENSORS)
TENSORS = {t.name: t for t in CLASSIFIER_INPUT_TENSORS + CLASSIFIER_OUTPUT_TENSORS}  # the classifier's, by name


def dtype(name: str):
    """numpy dtype of a classifier tensor."""
    return TENSORS[name].dtype

# Prometheus metrics of email_classifier (Python-backend custom metrics on Triton's metrics port),
# every one labelled with the classifier version
METRIC_STAGE_MS = "mailroute_stage_duration_ms"  # histogram per stage (label "stage"), per server batch
METRIC_EMAILS = "mailroute_emails_total"  # counter: rows classified
METRIC_RERANKED = "mailroute_reranked_total"  # counter: rows stage 2 ran for (share reranked = this / emails)
METRIC_NEEDS_REVIEW = "mailroute_needs_review_total"  # counter: rows below their threshold
METRIC_ROW_ERRORS = "mailroute_row_errors_total"  # counter per error kind (label "kind")
STAGE_MS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

# request parameters
PARAM_TOP_K = "top_k"
PARAM_THRESHOLD = "threshold"
PARAM_GATE = "gate"  # bool: false reranks every email; true (default) lets the version's gate skip stage 2 (a version whose
# policy gives the cross-encoder no weight never runs stage 2)
