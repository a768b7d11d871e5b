"""The label index: a FAISS inner-product index over L2-normalised label embeddings.

It is saved with the taxonomy and a manifest naming the bi-encoder it was built from (version and
checksum of its weights): an index built by another encoder returns nonsense neighbours, so loading
checks the manifest and refuses a mismatch.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from mailroute.taxonomy import Taxonomy, load_taxonomy

INDEX_FILE, TAXONOMY_FILE, MANIFEST_FILE = "labels.faiss", "taxonomy.json", "manifest.json"


class IndexMismatch(RuntimeError):
    """The label index was built from another bi-encoder than the one it is used with."""


def _on_gpu(index):
    # faiss-gpu in production; faiss-cpu here answers 0 GPUs and the same code keeps the CPU index
    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


@dataclass
class LabelIndex:
    taxonomy: Taxonomy
    index: object  # faiss.Index
    manifest: dict

    @classmethod
    def build(cls, taxonomy: Taxonomy, label_embeddings: np.ndarray, encoder_id: str) -> "LabelIndex":
        xb = np.ascontiguousarray(label_embeddings, dtype=np.float32)  # (labels, dim)
        if xb.shape[0] != len(taxonomy):
            raise ValueError(f"LabelIndex expects one embedding per label ({len(taxonomy)}), but got {xb.shape[0]}")
        faiss.normalize_L2(xb)
        index = faiss.IndexFlatIP(xb.shape[1])
        index.add(xb)
        manifest = {"encoder": encoder_id, "taxonomy": taxonomy.fingerprint(), "labels": len(taxonomy), "dim": int(xb.shape[1])}
        return cls(taxonomy, _on_gpu(index), manifest)

    def search(self, xq: np.ndarray, k: int):
        """(batch, dim) normalised queries -> scores D (batch, k) and label ids I (batch, k), best first."""
        k = min(k, len(self.taxonomy))
        D, I = self.index.search(np.ascontiguousarray(xq, dtype=np.float32), k)
        return D, I

    def save(self, folder) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        index = faiss.index_gpu_to_cpu(self.index) if hasattr(self.index, "getDevice") else self.index
        faiss.write_index(index, str(folder / INDEX_FILE))
        self.taxonomy.save(folder / TAXONOMY_FILE)
        (folder / MANIFEST_FILE).write_text(json.dumps(self.manifest, indent=1) + "\n")

    @classmethod
    def load(cls, folder, expect_encoder: str = None) -> "LabelIndex":
        folder = Path(folder)
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        taxonomy = load_taxonomy(folder / TAXONOMY_FILE)
        if expect_encoder is not None and manifest["encoder"] != expect_encoder:
            raise IndexMismatch(
                f"label index in {folder} was built from bi-encoder {manifest['encoder']!r}, "
                f"but is used with {expect_encoder!r}: rebuild it with `mailroute export`"
            )
        if manifest["taxonomy"] != taxonomy.fingerprint():
            raise IndexMismatch(f"label index in {folder}: taxonomy.json changed after the index was built")
        index = faiss.read_index(str(folder / INDEX_FILE))
        if index.ntotal != len(taxonomy):
            raise IndexMismatch(f"label index in {folder} holds {index.ntotal} vectors for {len(taxonomy)} labels")
        return cls(taxonomy, _on_gpu(index), manifest)


def weights_id(path) -> str:
    """Identity of an encoder: sha256 (16 hex) of its weights file (model.safetensors or model.onnx)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
