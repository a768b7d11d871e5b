"""Tiny randomly initialised encoders with the real MiniLM tokenizer: fast stand-ins for the tests.

They assert behaviour (shapes, consistency, agreement, errors), never accuracy. Imported by conftest.py
and test modules as `tiny_encoders` (pytest puts tests/ on sys.path: it has conftest.py and no __init__.py).
"""

from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

from mailroute.settings import DEFAULTS
from training.models import base_model_dir


def make_tiny_base(folder, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A tiny randomly initialised BERT with the real MiniLM tokenizer, saved to `folder`."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=hidden * 2, max_position_embeddings=512)
    folder = Path(folder)
    BertModel(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(base_model_dir())).save_pretrained(folder)
    return folder


def tiny_bi_encoder(folder, seed: int = 0) -> SentenceTransformer:
    """A 2-layer random bi-encoder whose base weights are written to `folder` (the caller's, and removed by it)."""
    folder = Path(folder)
    make_tiny_base(folder, seed=seed)
    tr = Transformer(str(folder), max_seq_length=DEFAULTS.max_email_tokens)
    return SentenceTransformer(modules=[tr, Pooling(tr.get_embedding_dimension(), "mean"), Normalize()], device="cpu")
