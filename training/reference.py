"""The in-process reference classifier: the pipeline class over the PyTorch encoders of a run.

Evaluation uses it, and the Triton pipeline must agree with it (same labels, probabilities within
1e-4). Pooling and normalisation are one function (mailroute.torch_encoders.mean_pool_normalise) that the ONNX
export traces too.
"""

from pathlib import Path

from mailroute.flat_head import FlatHead
from mailroute.label_index import LabelIndex, weights_id
from mailroute.pipeline import TwoStageClassifier, load_tokenizer, same_tokenisation
from mailroute.repository import TOKENIZER_FILE, WEIGHTS_FILE
from mailroute.rerank_policy import RerankPolicy
from mailroute.run_layout import RunFolder
from mailroute.settings import DEFAULTS, BadSetting
from mailroute.torch_encoders import TorchEncoders
from training.models import load_bi_encoder, load_cross_encoder


def encoders_of_models(bi_model, cross_model, flat_model=None) -> TorchEncoders:
    """The pipeline's Encoders seam (the torch runtime's, TorchEncoders) over already-loaded sentence-transformers models:
    a SentenceTransformer, a CrossEncoder and, where there is one, the flat classifier's SentenceTransformer, used as they
    are (device, dtype) for evaluation in-process."""
    return TorchEncoders.of_modules(bi_model[0].auto_model,  # the BertModel inside the SentenceTransformer
                                    cross_model.model,  # the CrossEncoder's 1-label BertForSequenceClassification
                                    None if flat_model is None else flat_model[0].auto_model)  # the flat classifier's BertModel


def classifier_from_models(bi_model, cross_model, index: LabelIndex, bi_dir, cross_dir, flat=None, **kw) -> TwoStageClassifier:
    """flat: (the flat classifier's SentenceTransformer, its FlatHead), or None."""
    return TwoStageClassifier(
        encoders_of_models(bi_model, cross_model, None if flat is None else flat[0]), index,
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
