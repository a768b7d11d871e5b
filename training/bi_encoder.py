"""Stage 1: fine-tune the bi-encoder with MultipleNegativesRankingLoss (anchor = email, positive =
label text, or another email of its label), then build the exemplar-aware FAISS label index
(descriptions + training emails)."""

import tempfile

import numpy as np
from datasets import Dataset
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.base.sampler import BatchSamplers, DefaultBatchSampler
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

from mailroute.label_index import CardSpec, LabelIndex, LabelScoring
from mailroute.settings import DEFAULTS
from mailroute.taxonomy import Taxonomy
from training.models import drop_autocast_wrapper, trainer_precision_args


# What the MNR positive of an email is: its label's text; another training email of its label (what the
# exemplar-aware index compares an unseen email with); or one row of each.
BI_POSITIVES = ("description", "exemplar", "both")


def mnr_dataset(examples: list, taxonomy: Taxonomy, positives: str = "description", seed: int = 0) -> Dataset:
    """(anchor, positive) rows for MultipleNegativesRankingLoss.

    "description": the label text (every row of a label shares it, so NO_DUPLICATES batching keeps
    two rows of one label apart). "exemplar" / "both": the rows also carry a "label" column, which
    LabelDisjointBatchSampler reads (the loss ignores it); an email's exemplar positive is the next
    email of its label in a seeded shuffle of that label's emails (never itself: a label's emails form
    one cycle), or its label text when it is the label's only email."""
    if positives not in BI_POSITIVES:
        raise ValueError(f"bi-encoder positives must be one of {', '.join(BI_POSITIVES)}; got {positives!r}")
    texts = taxonomy.texts
    labels = [taxonomy.index(e.label) for e in examples]
    if positives == "description":
        return Dataset.from_dict({"anchor": [e.text for e in examples], "positive": [texts[y] for y in labels]})
    rng = np.random.default_rng(seed)
    partner = np.full(len(examples), -1)
    for lab in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(np.asarray(labels) == lab))
        if len(rows) > 1:
            partner[rows] = np.roll(rows, -1)
    rows = {"anchor": [], "positive": [], "label": []}
    for i, (e, y) in enumerate(zip(examples, labels)):
        positive_texts = [texts[y]] if positives == "both" or partner[i] < 0 else []
        if partner[i] >= 0:
            positive_texts.append(examples[partner[i]].text)
        for text in positive_texts:
            rows["anchor"].append(e.text)
            rows["positive"].append(text)
            rows["label"].append(y)
    return Dataset.from_dict(rows)


class LabelDisjointBatchSampler(DefaultBatchSampler):
    """Batches in which no two rows share a label, so every other row's positive is a true negative for
    MNR (sentence-transformers' NO_DUPLICATES compares texts, and two emails of one label differ).

    The number of batches is fixed, B = max(ceil(rows / batch_size), rows of the largest label), so
    the learning-rate schedule the trainer plans from len() holds every epoch; each label's rows are
    spread evenly over the B batches from a random offset (a label never meets itself: it has at most
    B rows), which keeps the batches about equal instead of leaving a tail of one-label batches that
    have no negatives. A batch over batch_size hands rows to batches with room and without their
    label. Seeded per epoch. Reads the first of valid_label_columns in the dataset; drop_last has
    nothing to drop (no batch is a remainder)."""

    def __init__(self, dataset, batch_size: int, drop_last: bool, valid_label_columns: list = None, generator=None, seed: int = 0):
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last, valid_label_columns=valid_label_columns,
                         generator=generator, seed=seed)
        column = next((c for c in (valid_label_columns or []) if c in dataset.column_names), None)
        if column is None:
            raise ValueError(f"LabelDisjointBatchSampler needs one of the label columns {valid_label_columns} in the dataset "
                             f"(it has {dataset.column_names})")
        self.labels = np.asarray(dataset[column])
        _, counts = np.unique(self.labels, return_counts=True)
        self.n_batches = max(-(-len(self.labels) // batch_size), int(counts.max(initial=0)))

    def _batches(self) -> list:
        rng = np.random.default_rng(int(self.seed) + int(getattr(self, "epoch", 0)))
        B = self.n_batches
        batches = [[] for _ in range(B)]
        for lab in rng.permutation(np.unique(self.labels)):
            rows = rng.permutation(np.flatnonzero(self.labels == lab))
            offset = int(rng.integers(B))
            for j, row in enumerate(rows):
                batches[(offset + j * B // len(rows)) % B].append(int(row))
        for batch in batches:  # the rare batch over the size gives rows to batches with room, never two of a label
            while len(batch) > self.batch_size:
                row = batch[-1]
                room = next((b for b in batches if len(b) < self.batch_size and self.labels[row] not in self.labels[b]), None)
                if room is None:
                    break
                room.append(batch.pop())
        return [rng.permutation(batches[i]).tolist() for i in rng.permutation(B) if batches[i]]

    def __iter__(self):
        yield from self._batches()

    def __len__(self) -> int:
        return self.n_batches


def train_bi_encoder(model, examples: list, taxonomy: Taxonomy, epochs: float, batch_size: int, lr: float, seed: int,
                     device: str = "cpu", positives: str = "description", precision: str = "auto"):
    """In-batch negatives without false negatives: no batch holds two rows of one label (which also
    caps the batch at the number of labels). With label-text positives every row of a label has the
    same positive, so sentence-transformers' NO_DUPLICATES sampler does it; with email positives
    LabelDisjointBatchSampler does."""
    batch_size = min(batch_size, len(taxonomy))
    dataset = mnr_dataset(examples, taxonomy, positives, seed)
    sampler = BatchSamplers.NO_DUPLICATES if positives == "description" else LabelDisjointBatchSampler
    with tempfile.TemporaryDirectory(prefix="mailroute-bi-") as tmp:
        args = SentenceTransformerTrainingArguments(
            output_dir=tmp, num_train_epochs=epochs, per_device_train_batch_size=batch_size,
            learning_rate=lr, warmup_steps=0.1, batch_sampler=sampler, seed=seed, data_seed=seed,
            save_strategy="no", logging_steps=50, report_to="none", dataloader_num_workers=0, **trainer_precision_args(device, precision),
        )
        loss = MultipleNegativesRankingLoss(model)  # scale 20, cosine similarity: the standard recipe
        SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss).train()
    drop_autocast_wrapper(model)
    return model


def embed(model, texts: list, batch_size: int = DEFAULTS.embed_batch) -> np.ndarray:
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
