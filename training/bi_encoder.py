"""Stage 1: fine-tune the bi-encoder with MultipleNegativesRankingLoss (anchor = email, positive =
label text), then build the exemplar-aware FAISS label index (descriptions + training emails)."""

import tempfile

import numpy as np
from datasets import Dataset
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.base.sampler import BatchSamplers
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

from mailroute.label_index import CardSpec, LabelIndex, LabelScoring
from mailroute.taxonomy import Taxonomy
from training.models import drop_autocast_wrapper


def mnr_dataset(examples: list, taxonomy: Taxonomy) -> Dataset:
    texts = taxonomy.texts
    return Dataset.from_dict({"anchor": [e.text for e in examples], "positive": [texts[taxonomy.index(e.label)] for e in examples]})


def trainer_device_args(device: str) -> dict:
    """TrainingArguments for the device: bf16 autocast on a GPU that supports it (else fp16), fp32 on CPU."""
    if device != "cuda":
        return {"use_cpu": True}
    import torch

    return {"use_cpu": False, "bf16": torch.cuda.is_bf16_supported(), "fp16": not torch.cuda.is_bf16_supported()}


def train_bi_encoder(model, examples: list, taxonomy: Taxonomy, epochs: float, batch_size: int, lr: float, seed: int,
                     device: str = "cpu"):
    """In-batch negatives without false negatives: every row of a label has the same positive text,
    so the NO_DUPLICATES sampler never puts two rows of one label in a batch (which also caps the
    batch at the number of labels)."""
    batch_size = min(batch_size, len(taxonomy))
    with tempfile.TemporaryDirectory(prefix="mailroute-bi-") as tmp:
        args = SentenceTransformerTrainingArguments(
            output_dir=tmp, num_train_epochs=epochs, per_device_train_batch_size=batch_size,
            learning_rate=lr, warmup_steps=0.1, batch_sampler=BatchSamplers.NO_DUPLICATES, seed=seed, data_seed=seed,
            save_strategy="no", logging_steps=50, report_to="none", dataloader_num_workers=0, **trainer_device_args(device),
        )
        loss = MultipleNegativesRankingLoss(model)  # scale 20, cosine similarity: the standard recipe
        SentenceTransformerTrainer(model=model, args=args, train_dataset=mnr_dataset(examples, taxonomy), loss=loss).train()
    drop_autocast_wrapper(model)
    return model


def embed(model, texts: list, batch_size: int = 64) -> np.ndarray:
    return model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=len(texts) > 2000)


def prototypes(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Rows of x (one label's exemplars) -> indices of n medoids: the exemplar nearest each k-means
    centroid, so a prototype stays a real email that an export can re-embed."""
    import faiss

    if len(x) <= n:
        return np.arange(len(x))
    km = faiss.Kmeans(x.shape[1], n, niter=20, seed=seed, spherical=True, verbose=False)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    _, nearest = faiss.knn(km.centroids, np.ascontiguousarray(x, dtype=np.float32), 1, metric=faiss.METRIC_INNER_PRODUCT)
    return np.unique(nearest[:, 0])


def label_cards(taxonomy: Taxonomy, examples: list, x: np.ndarray, spec: CardSpec) -> tuple:
    """The label side of each cross-encoder pair: description plus the n emails of that label nearest
    its centroid (its most typical ones), within a character budget.

    Returns (cards, the example texts used: kept out of the cross-encoder's training queries so that
    no email meets itself on the label side)."""
    if spec.examples <= 0:
        return None, set()
    labels = np.array([taxonomy.index(e.label) for e in examples])
    cards, used = [], set()
    for lab, description in enumerate(taxonomy.texts):
        rows = np.flatnonzero(labels == lab)
        if not len(rows):
            cards.append(description)
            continue
        centroid = x[rows].mean(0)
        best = rows[np.argsort(-(x[rows] @ centroid), kind="stable")[:spec.examples]]
        used.update(examples[i].text for i in best)
        cards.append(spec.text(description, [examples[i].text for i in best]))
    return cards, used


def build_label_index(model, taxonomy: Taxonomy, encoder_id: str, examples: list = (), scoring: LabelScoring = None,
                      cards: list = None, max_exemplars_per_label: int = 0, seed: int = 0, x: np.ndarray = None,
                      card_spec: CardSpec = CardSpec()) -> LabelIndex:
    """Descriptions plus training emails as exemplars (k-means medoids when a label has more than
    max_exemplars_per_label; 0 = keep all); x: the examples' embeddings when already computed."""
    xb = embed(model, taxonomy.texts)
    if not examples:
        return LabelIndex.build(taxonomy, xb, encoder_id, scoring=scoring, cards=cards, card_spec=card_spec)
    x = embed(model, [e.text for e in examples]) if x is None else x  # (n, dim)
    labels = np.array([taxonomy.index(e.label) for e in examples])
    keep = []
    for lab in range(len(taxonomy)):  # exemplars grouped by label
        rows = np.flatnonzero(labels == lab)
        if max_exemplars_per_label and len(rows) > max_exemplars_per_label:
            rows = rows[prototypes(x[rows], max_exemplars_per_label, seed)]
        keep.extend(rows.tolist())
    keep = np.array(keep, dtype=np.int64)
    return LabelIndex.build(taxonomy, xb, encoder_id, x[keep], labels[keep], [examples[i].text for i in keep], scoring, cards,
                            card_spec)


def anisotropy(model, texts: list, pairs: int = 2000, seed: int = 0) -> float:
    """Mean cosine of random email pairs: high means every email looks alike to the encoder."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(texts), size=min(len(texts), 1000), replace=False)
    x = embed(model, [texts[i] for i in idx])  # (n, dim), normalised
    a, b = rng.integers(0, len(x), pairs), rng.integers(0, len(x), pairs)
    keep = a != b
    return float(np.mean(np.sum(x[a[keep]] * x[b[keep]], axis=1)))
