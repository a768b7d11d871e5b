"""The label index: FAISS inner-product indexes over L2-normalised embeddings of each label's
description and of its exemplars (training emails, later corrected emails; k-means medoids in their place
beyond --max-exemplars-per-label, off by default), and the rule that turns them into one score per label:

    score(label) = description_weight x cos(email, description)
                   + (1 - description_weight) x mean of the exemplar_top_n best cos(email, exemplar)

A label without exemplars is scored by its description alone, so a new label works zero-shot.
The exemplar texts are saved with the index: an export re-embeds them with the exported graph.

It is saved with the taxonomy and a manifest naming the bi-encoder it was built from (checksum of its
weights): an index built by another encoder returns nonsense neighbours, so loading checks the
manifest and refuses a mismatch.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np

from mailroute.settings import BrokenFile, read_json
from mailroute.taxonomy import CardSpec, Taxonomy, load_taxonomy  # noqa: F401 (CardSpec: part of this module's interface)

# file names inside a label index folder
INDEX_FILE, TAXONOMY_FILE, MANIFEST_FILE = "labels.faiss", "taxonomy.json", "manifest.json"
EXEMPLAR_INDEX_FILE, EXEMPLARS_FILE, CARDS_FILE = "exemplars.faiss", "exemplars.jsonl", "cards.json"




def exemplar_slots(labels: np.ndarray, n_labels: int, empty: int = -1) -> np.ndarray:
    """(n_labels, most exemplars of a label) int64: row l lists label l's exemplar rows in index order, then
    `empty`. The layout nearest cards choose from and the torch index scores labels through."""
    labels = np.asarray(labels, dtype=np.int64)
    have = np.bincount(labels, minlength=n_labels)
    slots = np.full((n_labels, max(1, int(have.max(initial=0)))), empty, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    start = np.concatenate([[0], np.cumsum(have)[:-1]])
    slots[labels[order], np.arange(len(order)) - start[labels[order]]] = order
    return slots


def _top_columns(x: np.ndarray, n: int) -> np.ndarray:
    """Per row the columns of its n largest values, largest first (an equal value: the lower column first):
    a partial sort, since a label has ~100 exemplars and a card shows 2 (a full argsort was 25 ms per 256
    emails at K=10)."""
    if n >= x.shape[1]:
        return np.argsort(-x, axis=1, kind="stable")
    part = np.argpartition(-x, n - 1, axis=1)[:, :n]
    # the n-th largest value may be shared by columns left out: take the lowest such columns, as a stable sort would
    kth = np.take_along_axis(x, part, 1).min(axis=1, keepdims=True)
    tied = (x == kth).sum(axis=1) != (np.take_along_axis(x, part, 1) == kth).sum(axis=1)
    if tied.any():
        part[tied] = np.argsort(-x[tied], axis=1, kind="stable")[:, :n]
    part = np.sort(part, axis=1)  # by column, then by value (stable): largest first, an equal value by column
    return np.take_along_axis(part, np.argsort(-np.take_along_axis(x, part, 1), axis=1, kind="stable"), 1)


class IndexMismatch(RuntimeError):
    """The label index was built from another bi-encoder than the one it is used with."""


def _on_gpu(index):
    # faiss-gpu in production; faiss-cpu here answers 0 GPUs and the same code keeps the CPU index
    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


def _to_cpu(index):
    return faiss.index_gpu_to_cpu(index) if hasattr(index, "getDevice") else index


def _read_index(path: Path):
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (the label index is incomplete)")
    try:
        return faiss.read_index(str(path))
    except RuntimeError as e:  # FAISS reports a cut-off or foreign file as a RuntimeError with its C++ context
        raise BrokenFile(f"{path}: not a FAISS index ({str(e).rsplit(': ', 1)[-1][:200]})") from None


def _flat_ip(x: np.ndarray, dim: int):
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, dim)
    faiss.normalize_L2(x)
    index = faiss.IndexFlatIP(dim)
    index.add(x)
    return index


@dataclass(frozen=True)
class LabelScoring:
    """How description and exemplar cosines become one label score (chosen on validation)."""
    exemplar_top_n: int = 5  # mean of this many best exemplar cosines per label
    description_weight: float = 0.3  # share of the description cosine (1 = descriptions only)
    search_depth: int = 1024  # exemplar neighbours FAISS looks at per email (its GPU index caps k at 2048); on_device scores all

    def __post_init__(self):
        if self.exemplar_top_n < 1 or not 0.0 <= self.description_weight <= 1.0 or self.search_depth < 1:
            raise ValueError(f"LabelScoring expects exemplar_top_n >= 1, 0 <= description_weight <= 1, search_depth >= 1, "
                             f"but got {self}")


@dataclass
class LabelIndex:
    taxonomy: Taxonomy
    index: object  # faiss.Index over the descriptions, one vector per label, in taxonomy order
    manifest: dict
    exemplar_index: object = None  # faiss.Index over the exemplars (None: descriptions only)
    exemplar_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (n_exemplars,) label id of each
    exemplar_texts: list = field(default_factory=list)  # the emails behind the exemplar vectors
    cards: list = None  # label side of the cross-encoder pairs; None = taxonomy texts
    scoring: LabelScoring = LabelScoring()
    exemplar_vectors: np.ndarray = None  # (n_exemplars, dim), read off exemplar_index when nearest cards need it

    @classmethod
    def build(cls, taxonomy: Taxonomy, label_embeddings: np.ndarray, encoder_id: str, exemplar_embeddings: np.ndarray = None,
              exemplar_labels=None, exemplar_texts=None, scoring: LabelScoring = None, cards: list = None,
              card_spec: CardSpec = None) -> "LabelIndex":
        """card_spec: the format `cards` were made in (required with cards: labels added later are carded alike)."""
        xb = np.asarray(label_embeddings, dtype=np.float32)  # (labels, dim)
        if xb.ndim != 2 or xb.shape[0] != len(taxonomy):
            raise ValueError(f"LabelIndex expects one embedding per label ({len(taxonomy)}), but got {xb.shape}")
        dim = int(xb.shape[1])
        manifest = {"encoder": encoder_id, "taxonomy": taxonomy.fingerprint(), "labels": len(taxonomy), "dim": dim, "exemplars": 0}
        self = cls(taxonomy, _on_gpu(_flat_ip(xb, dim)), manifest, scoring=scoring or LabelScoring(), cards=cards)
        if cards is not None and len(cards) != len(taxonomy):
            raise ValueError(f"LabelIndex expects one card per label ({len(taxonomy)}), but got {len(cards)}")
        if cards is not None:
            if card_spec is None:
                raise ValueError("LabelIndex.build got cards without their CardSpec: pass the format they were made in")
            manifest["cards"] = asdict(card_spec)
        if exemplar_embeddings is not None and len(exemplar_embeddings):
            ids = np.asarray(exemplar_labels, dtype=np.int64)
            if len(ids) != len(exemplar_embeddings) or (exemplar_texts is not None and len(exemplar_texts) != len(ids)):
                raise ValueError(f"LabelIndex expects one label id and text per exemplar, but got {len(exemplar_embeddings)} "
                                 f"embeddings, {len(ids)} ids, {None if exemplar_texts is None else len(exemplar_texts)} texts")
            if ids.min() < 0 or ids.max() >= len(taxonomy):
                raise ValueError(f"LabelIndex exemplar label ids must be in [0, {len(taxonomy)}), got [{ids.min()}, {ids.max()}]")
            self.exemplar_index = _on_gpu(_flat_ip(exemplar_embeddings, dim))
            self.exemplar_labels = ids
            self.exemplar_texts = list(exemplar_texts) if exemplar_texts is not None else [""] * len(ids)
            manifest["exemplars"] = int(len(ids))
        manifest["scoring"] = asdict(self.scoring)
        return self

    def __len__(self) -> int:
        return len(self.taxonomy)

    @property
    def card_spec(self) -> CardSpec:
        """The format of this index's cards (indexes saved before it was recorded: the default, which they used).
        Made once per manifest entry: nearest cards read it for every new card while serving."""
        cards = self.manifest.get("cards")
        if getattr(self, "_card_spec_of", False) is not cards:
            self._card_spec, self._card_spec_of = CardSpec(**(cards or {})), cards
        return self._card_spec

    @property
    def label_texts(self) -> list:
        """What the cross-encoder reads on the label side: the label card, or the description."""
        return self.cards if self.cards is not None else self.taxonomy.texts

    def pair_cards(self, xq: np.ndarray, candidates: list, exclude: np.ndarray = None) -> list:
        """The label side of each (email, candidate label) pair, flattened in order (sum of len(candidates[i])).

        Fixed cards (`label_texts`) unless the card format is `nearest`; then each candidate's card is its
        label text plus its exemplars nearest to email i (cosine of the bi-encoder embeddings xq (n, dim), best
        first), never exemplar row exclude[i] (the email itself while training mines it; -1 none). A label
        without exemplars reads its label text alone, as its fixed card does."""
        if not self.card_spec.nearest or self.exemplar_index is None:
            texts = self.label_texts
            return [texts[int(c)] for cand in candidates for c in np.asarray(cand).reshape(-1)]
        return ["".join(self.card_pieces(key)) for key in self.pair_card_keys(xq, candidates, exclude).tolist()]

    def pair_card_keys(self, xq: np.ndarray, candidates: list, exclude: np.ndarray = None) -> np.ndarray:
        """Nearest cards (`pair_cards`) as keys: (pairs, 1 + examples) int64, per pair its label id and the
        exemplar rows its card shows, best first (-1 padded); `card_pieces` turns a key into the card. Equal
        keys are equal cards, so a caller can tokenise each card, or each piece of it, once (the index is
        never changed in place: feedback and exports build a new one)."""
        spec = self.card_spec
        if not spec.nearest or self.exemplar_index is None:
            raise ValueError("pair_card_keys: this index's cards are fixed per label (label_texts), not made per email")
        if xq is None or len(xq) != len(candidates):
            raise ValueError(f"nearest cards: this index's cards show each email's nearest exemplars; it needs one embedding per email "
                             f"({len(candidates)}), got {None if xq is None else len(xq)}")
        E, slots = self._exemplar_slots()
        cand = [np.asarray(c, dtype=np.int64).reshape(-1) for c in candidates]
        email = np.repeat(np.arange(len(cand)), [len(c) for c in cand])  # (pairs,)
        labels = np.concatenate(cand) if cand else np.zeros(0, np.int64)
        rows = slots[labels]  # (pairs, slots) exemplar rows of each pair's label, -1 padded
        sims = (np.asarray(xq, np.float32) @ E.T)[email[:, None], np.maximum(rows, 0)]  # (pairs, slots)
        sims[rows < 0] = -np.inf
        if exclude is not None:  # an email never sees itself (training mines leave-one-out)
            sims[rows == np.asarray(exclude, np.int64)[email][:, None]] = -np.inf
        best = _top_columns(sims, spec.examples)  # (pairs, examples)
        shown = np.where(np.isfinite(np.take_along_axis(sims, best, 1)), np.take_along_axis(rows, best, 1), -1)
        if shown.shape[1] < spec.examples:
            shown = np.pad(shown, ((0, 0), (0, spec.examples - shown.shape[1])), constant_values=-1)
        return np.concatenate([labels[:, None], shown], axis=1)

    def card_pieces(self, key) -> list:
        """A `pair_card_keys` key -> its card as `CardSpec.segments` (joined: the card text): the label text
        plus the exemplars shown (one whose text is empty shows nothing)."""
        label, rows = int(key[0]), key[1:]
        return self.card_spec.segments(self.taxonomy.labels[label].text(), [t for t in (self.exemplar_texts[int(r)] for r in rows if r >= 0) if t])

    def _exemplar_slots(self) -> tuple:
        """(exemplar vectors (n, dim) float32, (labels, slots) exemplar rows of each label padded with -1), once."""
        if getattr(self, "_slots", None) is None:
            if self.exemplar_vectors is None:
                self.exemplar_vectors = np.ascontiguousarray(self.exemplar_index.reconstruct_n(0, self.exemplar_index.ntotal), np.float32)
            self._slots = exemplar_slots(self.exemplar_labels, len(self.taxonomy))
        return self.exemplar_vectors, self._slots

    def label_scores(self, xq: np.ndarray, scoring: LabelScoring = None, exclude: np.ndarray = None) -> np.ndarray:
        """(n, dim) normalised emails -> (n, labels) label scores.

        exclude: optional (n,) exemplar row per email to leave out (-1 none): an email never counts as
        its own exemplar when training candidates are mined (leave-one-out).
        """
        s = scoring or self.scoring
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        n, L = len(xq), len(self.taxonomy)
        desc = np.empty((n, L), dtype=np.float64)
        Dd, Id = self.index.search(xq, L)  # (n, labels) best first: put back in label order
        np.put_along_axis(desc, Id, Dd, axis=1)
        if self.exemplar_index is None or s.description_weight >= 1.0:
            return desc
        have = np.broadcast_to(np.bincount(self.exemplar_labels, minlength=L), (n, L))  # exemplars of each label, per email
        if exclude is not None:  # an email's excluded exemplar does not exist for it
            rows = np.flatnonzero(np.asarray(exclude) >= 0)
            have = have.copy()
            have[rows, self.exemplar_labels[np.asarray(exclude)[rows]]] -= 1
        if hasattr(self.exemplar_index, "label_means"):  # scored on the device, exactly (on_device)
            ex = self.exemplar_index.label_means(xq, s.exemplar_top_n, exclude)
        else:
            ex = self._exemplar_means_near(xq, s, have, exclude)
        # labels without exemplars are scored by their description alone
        return np.where(have > 0, s.description_weight * desc + (1 - s.description_weight) * ex, desc)

    def _exemplar_means_near(self, xq: np.ndarray, s: LabelScoring, have: np.ndarray, exclude: np.ndarray = None) -> np.ndarray:
        """(n, labels) mean of each label's top-n exemplar cosines among the search_depth nearest exemplars (FAISS).
        have: (n, labels) exemplars of each label for each email (its excluded one not counted)."""
        n, L = len(xq), len(self.taxonomy)
        depth = min(s.search_depth, self.exemplar_index.ntotal)
        De, Ie = self.exemplar_index.search(xq, depth)  # (n, depth) best first
        owner = self.exemplar_labels[Ie]  # (n, depth)
        if exclude is not None:  # an excluded hit moves to a label of its own (L), dropped below
            owner = np.where(Ie == np.asarray(exclude)[:, None], L, owner)
        # rank of each hit within its label: group by label (stable, so best first inside a group)
        order = np.argsort(owner, axis=1, kind="stable")
        o, d = np.take_along_axis(owner, order, 1), np.take_along_axis(De.astype(np.float64), order, 1)  # (n, depth)
        pos = np.broadcast_to(np.arange(depth), (n, depth))
        starts = np.maximum.accumulate(np.where(np.diff(o, axis=1, prepend=-1) != 0, pos, 0), axis=1)
        use = (pos - starts) < s.exemplar_top_n
        r = np.broadcast_to(np.arange(n)[:, None], (n, depth))
        ex = np.zeros((n, L + 1))
        taken = np.zeros((n, L + 1))
        np.add.at(ex, (r[use], o[use]), d[use])
        np.add.at(taken, (r[use], o[use]), 1)
        ex, taken = ex[:, :L], taken[:, :L]
        # labels with fewer hits than top_n are padded with the deepest similarity seen (an upper bound
        # of what was not looked at)
        floor = De[:, -1:].astype(np.float64)
        want = np.minimum(s.exemplar_top_n, have)  # (n, labels)
        return (ex + np.maximum(want - taken, 0) * floor) / np.maximum(want, 1)

    def search(self, xq: np.ndarray, k: int, scoring: LabelScoring = None, exclude: np.ndarray = None):
        """(batch, dim) normalised queries -> label scores D (batch, k) and label ids I (batch, k), best first."""
        k = min(k, len(self.taxonomy))
        scores = self.label_scores(xq, scoring, exclude)  # (batch, labels)
        I = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, I, axis=1).astype(np.float32), I

    def save(self, folder) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(_to_cpu(self.index), str(folder / INDEX_FILE))
        self.taxonomy.save(folder / TAXONOMY_FILE)
        if self.exemplar_index is not None:
            faiss.write_index(_to_cpu(self.exemplar_index), str(folder / EXEMPLAR_INDEX_FILE))
            with open(folder / EXEMPLARS_FILE, "w") as f:
                names = self.taxonomy.names
                for lab, text in zip(self.exemplar_labels, self.exemplar_texts):
                    f.write(json.dumps({"label": names[int(lab)], "text": text}) + "\n")
        if self.cards is not None:
            (folder / CARDS_FILE).write_text(json.dumps(self.cards, indent=0) + "\n")
        (folder / MANIFEST_FILE).write_text(json.dumps(self.manifest, indent=1) + "\n")

    @classmethod
    def load(cls, folder, expect_encoder: str = None) -> "LabelIndex":
        """IndexMismatch when the parts do not belong together; BrokenFile naming the file when one no longer reads as
        what save() wrote (cut off, edited by hand); FileNotFoundError when one is missing."""
        folder = Path(folder)
        manifest = read_json(folder / MANIFEST_FILE)
        missing = [k for k in ("encoder", "taxonomy") if not isinstance(manifest, dict) or k not in manifest]
        if missing:
            raise BrokenFile(f"{folder / MANIFEST_FILE}: not a label index manifest (no {' and no '.join(missing)})")
        taxonomy = load_taxonomy(folder / TAXONOMY_FILE)
        if expect_encoder is not None and manifest["encoder"] != expect_encoder:
            raise IndexMismatch(
                f"label index in {folder} was built from bi-encoder {manifest['encoder']!r}, "
                f"but is used with {expect_encoder!r}: rebuild it with `mailroute export`"
            )
        if manifest["taxonomy"] != taxonomy.fingerprint():
            raise IndexMismatch(f"label index in {folder}: taxonomy.json changed after the index was built")
        index = _read_index(folder / INDEX_FILE)
        if index.ntotal != len(taxonomy):
            raise IndexMismatch(f"label index in {folder} holds {index.ntotal} vectors for {len(taxonomy)} labels")
        try:
            scoring = LabelScoring(**manifest.get("scoring", {}))
        except (TypeError, ValueError) as e:  # a field save() never writes; a value out of its range
            raise BrokenFile(f"{folder / MANIFEST_FILE}: its scoring does not read ({e})") from None
        self = cls(taxonomy, _on_gpu(index), manifest, scoring=scoring)
        if manifest.get("exemplars"):
            path = folder / EXEMPLARS_FILE
            try:
                rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                labels, texts = [taxonomy.index(r["label"]) for r in rows], [r["text"] for r in rows]
            except (ValueError, KeyError, TypeError) as e:  # not JSON lines; a row without label/text; a label not in the taxonomy
                raise BrokenFile(f"{path}: not the exemplar rows save() wrote ({type(e).__name__}: {e})") from None
            ex = _read_index(folder / EXEMPLAR_INDEX_FILE)
            if ex.ntotal != len(rows) or len(rows) != manifest["exemplars"]:
                raise IndexMismatch(f"label index in {folder}: {ex.ntotal} exemplar vectors, {len(rows)} exemplar rows, "
                                    f"manifest says {manifest['exemplars']}")
            self.exemplar_index = _on_gpu(ex)
            self.exemplar_labels = np.array(labels, dtype=np.int64)
            self.exemplar_texts = texts
        if (folder / CARDS_FILE).exists():
            self.cards = read_json(folder / CARDS_FILE)
        return self

    def on_device(self, device: str) -> "LabelIndex":
        """The same vectors searched by torch on `device`: the torch runtime's label search where faiss-gpu is
        not installed. Descriptions by a matrix product + top-k; exemplars scored per label on the device
        (exact, see TorchExemplarIndex), so one (emails, labels) array comes back per batch. For serving only
        (save() needs the FAISS indexes)."""
        from dataclasses import replace

        from mailroute.torch_encoders import TorchExemplarIndex, TorchFlatIP

        ex = self.exemplar_index
        vectors = None if ex is None else self._exemplar_slots()[0]  # nearest cards read them; the torch index keeps its own copy
        return replace(self, index=TorchFlatIP(self.index.reconstruct_n(0, self.index.ntotal), device), exemplar_vectors=vectors,
                       exemplar_index=None if ex is None else TorchExemplarIndex(vectors, self.exemplar_labels,
                                                                                 len(self.taxonomy), device))

    def with_scoring(self, scoring: LabelScoring) -> "LabelIndex":
        """The same vectors scored by another rule (a new object; this one is unchanged)."""
        from dataclasses import replace

        return replace(self, scoring=scoring, manifest=self.manifest | {"scoring": asdict(scoring)})


def weights_id(path) -> str:
    """Identity of an encoder: sha256 (16 hex) of its weights file (model.safetensors or model.onnx)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
