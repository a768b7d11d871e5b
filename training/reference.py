"""The in-process reference classifier: the pipeline class over the PyTorch encoders of a run.

Evaluation uses it, and the Triton pipeline must agree with it (same labels, probabilities within
1e-4). Pooling and normalisation are one function (mailroute.torch_encoders.mean_pool_normalise) that the ONNX
export traces too.
"""

from pathlib import Path

import numpy as np
import torch

from mailroute.flat_head import FlatHead
from mailroute.label_index import LabelIndex, weights_id
from mailroute.pipeline import NoFlatClassifier, TwoStageClassifier, load_tokenizer, same_tokenisation
from mailroute.repository import TOKENIZER_FILE, WEIGHTS_FILE
from mailroute.rerank_policy import RerankPolicy
from mailroute.run_layout import RunFolder
from mailroute.settings import DEFAULTS, BadSetting
from mailroute.torch_encoders import mean_pool_normalise
from training.models import load_bi_encoder, load_cross_encoder


class SentenceTransformerEncoders:
    """The pipeline's Encoders seam over already-loaded sentence-transformers models (a SentenceTransformer, a
    CrossEncoder and, where there is one, the flat classifier's SentenceTransformer), for evaluation in-process.
    Not mailroute.torch_encoders.TorchEncoders, which loads weight folders."""

    def __init__(self, bi_model, cross_model, flat_model=None):
        self.bi = bi_model[0].auto_model.eval()  # the BertModel inside the SentenceTransformer
        self.cross = cross_model.model.eval()  # BertForSequenceClassification, 1 label, no activation
        self.flat = None if flat_model is None else flat_model[0].auto_model.eval()
        self.device = next(self.bi.parameters()).device

    @torch.no_grad()
    def _pooled(self, model, input_ids, attention_mask):
        d = next(model.parameters()).device
        ids, mask = torch.from_numpy(input_ids).to(d), torch.from_numpy(attention_mask).to(d)
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state  # (n, seq, dim)
        return mean_pool_normalise(out.float(), mask).cpu().numpy()

    def embed(self, input_ids, attention_mask):
        return self._pooled(self.bi, input_ids, attention_mask)

    def flat_embed(self, input_ids, attention_mask):
        if self.flat is None:
            raise NoFlatClassifier()
        return self._pooled(self.flat, input_ids, attention_mask)

    @torch.no_grad()
    def score(self, input_ids, attention_mask, token_type_ids):
        d = next(self.cross.parameters()).device
        out = self.cross(input_ids=torch.from_numpy(input_ids).to(d), attention_mask=torch.from_numpy(attention_mask).to(d),
                         token_type_ids=torch.from_numpy(token_type_ids).to(d)).logits  # (n, 1)
        return out[:, 0].float().cpu().numpy().astype(np.float32)


def classifier_from_models(bi_model, cross_model, index: LabelIndex, bi_dir, cross_dir, flat=None, **kw) -> TwoStageClassifier:
    """flat: (the flat classifier's SentenceTransformer, its FlatHead), or None."""
    return TwoStageClassifier(
        SentenceTransformerEncoders(bi_model, cross_model, None if flat is None else flat[0]), index,
        load_tokenizer(Path(bi_dir) / TOKENIZER_FILE, DEFAULTS.max_email_tokens),
        load_tokenizer(Path(cross_dir) / TOKENIZER_FILE, DEFAULTS.max_pair_tokens), flat_head=None if flat is None else flat[1], **kw)


def load_flat(run_dir, labels, device: str = "cpu"):
    """A run's flat classifier: (its encoder, its head checked against the labels and the encoder's weights), or None
    where the run kept none. BadSetting where it tokenises unlike the run's bi-encoder: the pipeline feeds both encoders
    one tokenisation."""
    run = RunFolder(run_dir)
    if not run.has_flat():
        return None
    if not same_tokenisation(load_tokenizer(run.flat_encoder / TOKENIZER_FILE, DEFAULTS.max_email_tokens),
                             load_tokenizer(run.bi_encoder / TOKENIZER_FILE, DEFAULTS.max_email_tokens)):
        raise BadSetting(f"{run.flat_encoder} tokenises differently from {run.bi_encoder}: the pipeline feeds both encoders one "
                         f"tokenisation, so the flat classifier must start from the bi-encoder's base weights")
    head = FlatHead.load(run.flat_head).check(labels, weights_id(run.flat_encoder / WEIGHTS_FILE))
    return load_bi_encoder(run.flat_encoder, device=device), head


def load_policy(run_dir) -> RerankPolicy:
    """The run's fitted rerank policy (the default policy where a run has none yet)."""
    path = RunFolder(run_dir).policy
    return RerankPolicy.load(path) if path.exists() else RerankPolicy()


def load_reference(run_dir, **kw) -> TwoStageClassifier:
    """A trained run folder (bi_encoder/, cross_encoder/, label_index/) -> the reference classifier."""
    run = RunFolder(run_dir)
    index = LabelIndex.load(run.label_index)
    kw = {"policy": load_policy(run.root)} | kw
    return classifier_from_models(load_bi_encoder(run.bi_encoder), load_cross_encoder(run.cross_encoder), index,
                                  run.bi_encoder, run.cross_encoder, flat=load_flat(run.root, index.taxonomy.names), **kw)
