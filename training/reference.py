"""The in-process reference classifier: the pipeline class over the PyTorch encoders of a run.

Evaluation uses it, and the Triton pipeline must agree with it (same labels, probabilities within
1e-4). Pooling and normalisation here are written out the same way the ONNX graph computes them.
"""

import json
from pathlib import Path

import numpy as np
import torch

from mailroute.label_index import LabelIndex
from mailroute.pipeline import TwoStageClassifier, load_tokenizer
from mailroute.settings import DEFAULTS
from training.models import load_bi_encoder, load_cross_encoder


def mean_pool_normalise(token_embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(token_embeddings.dtype)  # (n, seq, 1)
    pooled = (token_embeddings * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (n, dim)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


class TorchEncoders:
    def __init__(self, bi_model, cross_model):
        self.bi = bi_model[0].auto_model.eval()  # the BertModel inside the SentenceTransformer
        self.cross = cross_model.model.eval()  # BertForSequenceClassification, 1 label, no activation

    @torch.no_grad()
    def embed(self, input_ids, attention_mask):
        ids, mask = torch.from_numpy(input_ids), torch.from_numpy(attention_mask)
        out = self.bi(input_ids=ids, attention_mask=mask).last_hidden_state  # (n, seq, dim)
        return mean_pool_normalise(out, mask).numpy()

    @torch.no_grad()
    def score(self, input_ids, attention_mask, token_type_ids):
        out = self.cross(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
                         token_type_ids=torch.from_numpy(token_type_ids)).logits  # (n, 1)
        return out[:, 0].numpy().astype(np.float32)


def classifier_from_models(bi_model, cross_model, index: LabelIndex, bi_dir, cross_dir, **kw) -> TwoStageClassifier:
    return TwoStageClassifier(
        TorchEncoders(bi_model, cross_model), index,
        load_tokenizer(Path(bi_dir) / "tokenizer.json", DEFAULTS.max_email_tokens),
        load_tokenizer(Path(cross_dir) / "tokenizer.json", DEFAULTS.max_pair_tokens), **kw)


RERANK_FILE = "rerank.json"  # how a run's cross-encoder scores are combined: {"prior_scale": ..., "k_train": ...}


def rerank_settings(run_dir) -> dict:
    path = Path(run_dir) / RERANK_FILE
    return json.loads(path.read_text()) if path.exists() else {"prior_scale": 0.0}


def load_reference(run_dir, **kw) -> TwoStageClassifier:
    """A trained run folder (bi_encoder/, cross_encoder/, label_index/) -> the reference classifier."""
    run = Path(run_dir)
    index = LabelIndex.load(run / "label_index")
    rr = rerank_settings(run)
    kw = {"prior_scale": rr["prior_scale"], "temperature": rr.get("temperature", 1.0)} | kw
    return classifier_from_models(load_bi_encoder(run / "bi_encoder"), load_cross_encoder(run / "cross_encoder"), index,
                                  run / "bi_encoder", run / "cross_encoder", **kw)
