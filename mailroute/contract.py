"""The one source of truth for model names and tensor names, dtypes and shapes.

export/ writes these into every config.pbtxt and ONNX graph; the Triton adapters, the pipeline and
the client read them from here. Token ids are int64 everywhere: onnxruntime takes them as exported, and TensorRT 10 (the 24.10
container) builds plans with int64 I/O, so no caller ever sees another dtype.
"""

import numpy as np

# model names inside the Triton repository
BI_ENCODER = "bi_encoder"
CROSS_ENCODER = "cross_encoder"
CLASSIFIER = "email_classifier"

# encoder tensors (both encoders)
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
TOKEN_TYPE_IDS = "token_type_ids"
EMBEDDING = "embedding"  # bi-encoder output: (batch, dim), mean pooled and L2 normalised
LOGIT = "logit"  # cross-encoder output: (batch, 1), raw score, no sigmoid
TOKEN_DTYPE = np.int64
TOKEN_TRITON_TYPE = "TYPE_INT64"

BI_ENCODER_INPUTS = (INPUT_IDS, ATTENTION_MASK)
CROSS_ENCODER_INPUTS = (INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS)

# classifier interface (what callers use)
TEXT = "TEXT"  # string, (batch, 1)
SUBJECT = "SUBJECT"  # optional string, (batch, 1)
LABEL = "LABEL"  # string, (batch, 1)
PROBABILITY = "PROBABILITY"  # fp32, (batch, 1)
TOP_LABELS = "TOP_LABELS"  # string, (batch, K)
TOP_PROBABILITIES = "TOP_PROBABILITIES"  # fp32, (batch, K)
NEEDS_REVIEW = "NEEDS_REVIEW"  # bool, (batch, 1)
ERROR = "ERROR"  # string, (batch, 1): empty when the row was classified, else why not
MODEL_VERSIONS = "MODEL_VERSIONS"  # string, (batch, 3): classifier, bi_encoder, cross_encoder
# fp32, (batch, 4): milliseconds each stage (STAGES) took for the server batch this row was part of. Per
# batch, not per row: one Triton batch merges several requests, so rows of a batch share these values
# and summing them over rows overcounts. Per-stage histograms are on the Prometheus endpoint (METRIC_*).
STAGE_MS = "STAGE_MS"
RERANKED = "RERANKED"  # bool, (batch, 1): stage 2 ran for this email (False where the gate found retrieval sure)

STAGES = ("preprocess", "embed", "search", "rerank")
CLASSIFIER_OUTPUTS = (LABEL, PROBABILITY, TOP_LABELS, TOP_PROBABILITIES, NEEDS_REVIEW, ERROR, MODEL_VERSIONS, STAGE_MS, RERANKED)

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
PARAM_GATE = "gate"  # bool: false reranks every email; true (default) lets the version's gate skip stage 2
