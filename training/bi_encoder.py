"""Stage 1: fine-tune the bi-encoder with MultipleNegativesRankingLoss (anchor = email, positive =
label text), then embed the label texts into the FAISS label index."""

import tempfile

import numpy as np
from datasets import Dataset
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.base.sampler import BatchSamplers
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

from mailroute.label_index import LabelIndex
from mailroute.taxonomy import Taxonomy


def mnr_dataset(examples: list, taxonomy: Taxonomy) -> Dataset:
    texts = taxonomy.texts
    return Dataset.from_dict({"anchor": [e.text for e in examples], "positive": [texts[taxonomy.index(e.label)] for e in examples]})


def train_bi_encoder(model, examples: list, taxonomy: Taxonomy, epochs: float, batch_size: int, lr: float, seed: int):
    """In-batch negatives without false negatives: every row of a label has the same positive text,
    so the NO_DUPLICATES sampler never puts two rows of one label in a batch (which also caps the
    batch at the number of labels)."""
    batch_size = min(batch_size, len(taxonomy))
    args = SentenceTransformerTrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="mailroute-bi-"), num_train_epochs=epochs, per_device_train_batch_size=batch_size,
        learning_rate=lr, warmup_steps=0.1, batch_sampler=BatchSamplers.NO_DUPLICATES, seed=seed, data_seed=seed,
        save_strategy="no", logging_steps=50, report_to="none", use_cpu=True, dataloader_num_workers=0,
    )
    loss = MultipleNegativesRankingLoss(model)  # scale 20, cosine similarity: the standard recipe
    SentenceTransformerTrainer(model=model, args=args, train_dataset=mnr_dataset(examples, taxonomy), loss=loss).train()
    return model


def embed(model, texts: list, batch_size: int = 64) -> np.ndarray:
    return model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=len(texts) > 2000)


def build_label_index(model, taxonomy: Taxonomy, encoder_id: str) -> LabelIndex:
    return LabelIndex.build(taxonomy, embed(model, taxonomy.texts), encoder_id)


def anisotropy(model, texts: list, pairs: int = 2000, seed: int = 0) -> float:
    """Mean cosine of random email pairs: high means every email looks alike to the encoder."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(texts), size=min(len(texts), 1000), replace=False)
    x = embed(model, [texts[i] for i in idx])  # (n, dim), normalised
    a, b = rng.integers(0, len(x), pairs), rng.integers(0, len(x), pairs)
    keep = a != b
    return float(np.mean(np.sum(x[a[keep]] * x[b[keep]], axis=1)))
