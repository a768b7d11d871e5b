"""The flat classifier's head: a linear softmax over every label, on the flat encoder's embedding.

The flat classifier is the baseline the two-stage system is measured against (the same MiniLM fine-tuned with
plain cross-entropy over all labels, training/flat_baseline.py). Its log-probability of each retrieved
candidate is one more score of the rerank fusion (mailroute.rerank_policy: flat_weight, gated_flat_weight):
on 9,000 held-out BANKING77 training emails the fusion led the flat classifier alone by +0.61 points where
the two-stage system alone tied it (benchmarks/RESULTS.md). Its encoder is served like the bi-encoder (same
tensors, its own Triton model, contract.FLAT_ENCODER); the head is this small matrix, kept in the classifier
version beside the label index, and applied in the pipeline.

Like the label index, the head records the encoder it sits on (`encoder_id`) and the label order of its rows,
and loading refuses either mismatch.
"""

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mailroute.label_index import IndexMismatch
from mailroute.settings import BrokenFile

# logits = LOGIT_SCALE x (weight @ embedding + bias): the embedding is L2-normalised, so without a scale the logits could not
# be confident (as MNR's cosine scale); training/flat_baseline.py trains with it
LOGIT_SCALE = 20.0


@dataclass(frozen=True)
class FlatHead:
    weight: np.ndarray  # (labels, dim)
    bias: np.ndarray  # (labels,)
    scale: float  # logits = scale x (weight @ embedding + bias) (LOGIT_SCALE when trained here)
    labels: tuple  # label names, in row order
    encoder_id: str  # mailroute.label_index.weights_id of the flat encoder's weights (or exported graph)

    def __post_init__(self):
        if self.weight.ndim != 2 or self.bias.shape != (len(self.weight),) or len(self.labels) != len(self.weight):
            raise ValueError(f"FlatHead expects (labels, dim) weight, (labels,) bias and a name per label, but got "
                             f"{self.weight.shape}, {self.bias.shape}, {len(self.labels)} names")

    def log_probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, dim) flat-encoder embeddings -> (n, labels) log-probabilities."""
        z = self.scale * (np.asarray(embeddings, np.float64) @ self.weight.T + self.bias)
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    def check(self, labels=None, encoder_id: str = None) -> "FlatHead":
        """Refuse (IndexMismatch) a head whose rows are other labels or whose encoder is another one (None: not checked)."""
        if labels is not None and tuple(labels) != self.labels:
            raise IndexMismatch(f"the flat head's {len(self.labels)} labels are not the classifier's {len(labels)} labels in its order")
        if encoder_id is not None and encoder_id != self.encoder_id:
            raise IndexMismatch(f"the flat head was trained on flat encoder {self.encoder_id}, but the encoder given is {encoder_id}")
        return self

    def with_encoder(self, encoder_id: str) -> "FlatHead":
        """The same head pinned to an encoder with the same weights in another form (the exported graph)."""
        return FlatHead(self.weight, self.bias, self.scale, self.labels, encoder_id)

    def save(self, path) -> None:
        np.savez(Path(path), weight=self.weight.astype(np.float32), bias=self.bias.astype(np.float32), scale=np.float64(self.scale),
                 labels=np.array(self.labels, dtype=str), encoder_id=np.array(self.encoder_id))

    @classmethod
    def load(cls, path) -> "FlatHead":
        """BrokenFile (a ValueError) naming the file when it is not a flat head as save() writes it (FileNotFoundError when
        absent)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no flat head at {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(z["weight"].astype(np.float64), z["bias"].astype(np.float64), float(z["scale"]), tuple(z["labels"].tolist()),
                           str(z["encoder_id"]))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # truncated, not npz, or missing arrays
            raise BrokenFile(f"{path} is not a flat head ({type(e).__name__}: {e})") from None
