"""The `torch` runtime: the encoders in PyTorch, and the label search on the same device (descriptions by a
matrix product + top-k, exemplars scored per label there).

On a GPU the encoders run in fp16 with CUDA graphs captured at load for bucketed (batch, sequence)
shapes: a batch is padded up to the nearest bucket (padded rows and positions are masked out, so the
answer does not change) and one graph replay runs the whole forward pass, which is what makes small
batches cheap (measured on an H200: one email's bi-encoder pass 4.16 ms eager, 0.29 ms replayed;
../shared/docs/gpu.md). Shapes beyond the largest bucket run eagerly. On a CPU the same code runs in
fp32 without graphs and agrees with the ONNX graphs within 1e-4 (tests/test_torch_runtime.py).

`TorchFlatIP` stands in for FAISS's IndexFlatIP where faiss-gpu is not installed: exact inner
product search, the same (scores, ids) within 1e-5 for k <= ntotal (FAISS pads beyond with id -1; this
returns ntotal columns). `TorchExemplarIndex` adds the label scoring over exemplars on the device, so
only (emails, labels) scores come back to the host instead of (emails, search_depth) neighbours.
"""

import numpy as np
import torch

from mailroute import contract
from mailroute.pipeline import NoFlatClassifier

BI, CROSS = "bi", "cross"
# The (rows, tokens) shapes a graph is captured for. Powers of two up to 16 rows (small batches are launch-bound: padded
# rows cost next to nothing), then steps of at most half the bucket below, so that a batch of 17-256 rows computes at
# most 1.5x its rows (about 1.15x on average) instead of up to 2x (1.4x) between powers of two: at concurrency the card
# is the bottleneck, and padded rows are its time spent on nothing. Lengths likewise. An encoder's own limits (its most
# rows and tokens, contract.ENCODER_LIMITS) are buckets of their own and its last: a full batch of full-length rows is
# not padded further, and nothing longer is ever sent.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)
SEQUENCE_BUCKETS = (16, 32, 48, 64, 96, 128, 160, 192, 256)
LIMITS = {BI: contract.ENCODER_LIMITS[contract.BI_ENCODER], CROSS: contract.ENCODER_LIMITS[contract.CROSS_ENCODER]}  # (rows, tokens) by kind
TOKEN_DTYPE = torch.from_numpy(np.zeros(0, contract.TOKEN_DTYPE)).dtype  # the contract's token dtype, as torch names it


def mean_pool_normalise(token_embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over unmasked tokens, then L2 normalisation: the bi-encoder's embedding (the ONNX graph computes the same)."""
    m = mask.unsqueeze(-1).to(token_embeddings.dtype)  # (n, seq, 1)
    pooled = (token_embeddings * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (n, dim)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def _bucket(n: int, buckets: tuple):
    return next((b for b in buckets if b >= n), None)


def buckets(grid: tuple, limit: int) -> tuple:
    """The grid's sizes below `limit`, then `limit` itself: the largest input a caller sends gets a graph of its exact size."""
    return tuple(b for b in grid if b < limit) + (int(limit),)


class TorchEncoder:
    """One encoder from a Hugging Face folder: kind "bi" (BertModel -> pooled, normalised embedding) or
    "cross" (BertForSequenceClassification, one label -> raw logit). max_batch, max_sequence: the largest graph
    captured, each a bucket of its own (default: the kind's limits, contract.ENCODER_LIMITS: no caller sends more, so
    larger graphs would only cost load time and memory); larger inputs run eagerly."""

    def __init__(self, folder, kind: str, device: str = "cpu", half: bool = None, cuda_graphs: bool = None,
                 max_batch: int = None, max_sequence: int = None):
        from transformers import AutoModel, AutoModelForSequenceClassification

        if kind not in (BI, CROSS):
            raise ValueError(f"kind must be {BI!r} or {CROSS!r}, got {kind!r}")
        self.kind, self.device = kind, torch.device(device)
        gpu = self.device.type == "cuda"
        if gpu and self.device.index is None:  # "cuda" -> "cuda:N" of the current device (set_device needs an index)
            self.device = torch.device("cuda", torch.cuda.current_device())
        if gpu:  # streams, graph pools and captures use the current device: make it this instance's (one per process)
            torch.cuda.set_device(self.device)
        self.dtype = torch.float16 if (gpu if half is None else half) else torch.float32
        cls = AutoModel if kind == BI else AutoModelForSequenceClassification
        self.model = cls.from_pretrained(str(folder)).eval().to(self.device, self.dtype)
        self.inputs = contract.BI_ENCODER_INPUTS if kind == BI else contract.CROSS_ENCODER_INPUTS
        self.batches = buckets(BATCH_BUCKETS, max_batch or LIMITS[kind][0])
        self.sequences = buckets(SEQUENCE_BUCKETS, max_sequence or LIMITS[kind][1])
        self.graphs = {}
        if gpu and (cuda_graphs is None or cuda_graphs):
            self._capture()

    @classmethod
    def of_module(cls, module, kind: str) -> "TorchEncoder":
        """An encoder over a model already in memory (a BertModel for "bi", a BertForSequenceClassification for
        "cross"), as it is: its device and dtype, no graphs, nothing copied (evaluation during training reads the
        model being trained)."""
        if kind not in (BI, CROSS):
            raise ValueError(f"kind must be {BI!r} or {CROSS!r}, got {kind!r}")
        self = cls.__new__(cls)
        self.kind, self.model = kind, module.eval()
        first = next(module.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.inputs = contract.BI_ENCODER_INPUTS if kind == BI else contract.CROSS_ENCODER_INPUTS
        self.batches, self.sequences, self.graphs = (), (), {}
        return self

    @torch.inference_mode()
    def _forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        if self.kind == BI:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (n, seq, dim)
            return mean_pool_normalise(out.float(), attention_mask)  # (n, dim) fp32
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits[:, :1].float()

    def _capture(self) -> None:
        """One CUDA graph per bucket, sharing one memory pool; warm-up runs on a side stream first."""
        pool = torch.cuda.graph_pool_handle()
        for b in self.batches:
            for s in self.sequences:
                static = {n: torch.zeros((b, s), dtype=TOKEN_DTYPE, device=self.device) for n in self.inputs}
                static[contract.ATTENTION_MASK][:, 0] = 1
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self._forward(**static)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self._forward(**static)
                self.graphs[(b, s)] = (graph, static, out)

    @staticmethod
    def pad(tensors: dict, batch: int, sequence: int) -> dict:
        """Inputs padded to a bucket's (batch, sequence): padded positions are 0 (masked out), and each padded
        row sees one token, so its pooling stays finite; the real rows' answers do not change."""
        n, seq = tensors[contract.INPUT_IDS].shape
        out = {}
        for k, t in tensors.items():
            out[k] = torch.zeros((batch, sequence), dtype=t.dtype, device=t.device)
            out[k][:n, :seq] = t
        out[contract.ATTENTION_MASK][n:, 0] = 1
        return out

    def __call__(self, feed: dict) -> np.ndarray:
        """{input name: (n, seq) int64 numpy} -> (n, dim) embeddings or (n, 1) logits, float32 numpy."""
        n, seq = feed[contract.INPUT_IDS].shape
        tensors = {k: torch.from_numpy(np.ascontiguousarray(feed[k])).to(self.device, non_blocking=True) for k in self.inputs}
        key = (_bucket(n, self.batches), _bucket(seq, self.sequences))
        if key not in self.graphs:
            return self._forward(**tensors).cpu().numpy()
        graph, static, out = self.graphs[key]
        for k, t in self.pad(tensors, *key).items():
            static[k].copy_(t)
        graph.replay()
        return out[:n].cpu().numpy()


class TorchEncoders:
    """The pipeline's Encoders seam over TorchEncoder instances: bi, cross and (where the classifier has one) flat (what the
    `torch` runtime serves). embed_batch and score_batch: the most rows the pipeline sends each in one call (their
    CUDA graphs' largest batch; the flat encoder takes the bi-encoder's)."""

    def __init__(self, bi_folder, cross_folder, device: str = "cpu", embed_batch: int = None, score_batch: int = None,
                 flat_folder=None, **kw):
        self.bi = TorchEncoder(bi_folder, BI, device, **kw | ({"max_batch": embed_batch} if embed_batch else {}))
        self.cross = TorchEncoder(cross_folder, CROSS, device, **kw | ({"max_batch": score_batch} if score_batch else {}))
        self.flat = None if flat_folder is None else TorchEncoder(flat_folder, BI, device, **kw | ({"max_batch": embed_batch} if embed_batch else {}))

    @classmethod
    def of_modules(cls, bi_module, cross_module, flat_module=None) -> "TorchEncoders":
        """Over models already in memory, as they are (TorchEncoder.of_module): what evaluation in training uses."""
        self = cls.__new__(cls)
        self.bi, self.cross = TorchEncoder.of_module(bi_module, BI), TorchEncoder.of_module(cross_module, CROSS)
        self.flat = None if flat_module is None else TorchEncoder.of_module(flat_module, BI)
        return self

    @classmethod
    def of_versions(cls, repo, bi_version: int, cross_version: int, device: str = "cpu", flat_version: int = None, **kw) -> "TorchEncoders":
        """The torch runtime's weights of the encoder versions a classifier version pins, from a model repository."""
        from pathlib import Path

        from mailroute.repository import TORCH_WEIGHTS_DIR

        repo = Path(repo)
        flat = None if flat_version is None else repo / contract.FLAT_ENCODER / str(flat_version) / TORCH_WEIGHTS_DIR
        return cls(repo / contract.BI_ENCODER / str(bi_version) / TORCH_WEIGHTS_DIR,
                   repo / contract.CROSS_ENCODER / str(cross_version) / TORCH_WEIGHTS_DIR, device, flat_folder=flat, **kw)

    def embed(self, input_ids, attention_mask):
        return self.bi(contract.feed(contract.BI_ENCODER, input_ids, attention_mask))

    def flat_embed(self, input_ids, attention_mask):
        if self.flat is None:
            raise NoFlatClassifier()
        return self.flat(contract.feed(contract.FLAT_ENCODER, input_ids, attention_mask))

    def score(self, input_ids, attention_mask, token_type_ids):
        return self.cross(contract.feed(contract.CROSS_ENCODER, input_ids, attention_mask, token_type_ids))[:, 0]


class TorchFlatIP:
    """Exact inner-product search as one matrix product + top-k on a torch device; the parts of FAISS's
    IndexFlatIP interface the label index uses (search, ntotal, d, reconstruct_n)."""

    def __init__(self, vectors: np.ndarray, device: str = "cpu"):
        self.device = torch.device(device)
        self.xb = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(self.device)  # (ntotal, d)
        self.ntotal, self.d = int(self.xb.shape[0]), int(self.xb.shape[1])

    @torch.inference_mode()
    def search(self, xq: np.ndarray, k: int) -> tuple:
        q = torch.from_numpy(np.ascontiguousarray(xq, dtype=np.float32)).to(self.device)
        D, I = torch.topk(q @ self.xb.T, min(k, self.ntotal), dim=1)  # best first, like FAISS
        return D.cpu().numpy(), I.cpu().numpy().astype(np.int64)

    def reconstruct_n(self, start: int, n: int) -> np.ndarray:
        return self.xb[start:start + n].cpu().numpy()


class TorchExemplarIndex(TorchFlatIP):
    """The exemplar vectors with their label ids, scored per label on the device: one matrix product, a
    gather into (labels, most exemplars of a label) slots, and a top-n. This is exact: the FAISS path looks
    at the search_depth nearest exemplars only and pads a label with fewer hits by the deepest cosine
    seen, so the two agree wherever each label's n best exemplars lie within that depth (always for
    the candidate labels in practice, and for every label when ntotal <= search_depth; tested)."""

    # (emails x labels x slots) floats per chunk of emails: bounds device memory for any batch
    CHUNK_ELEMENTS = 1 << 25

    def __init__(self, vectors: np.ndarray, labels: np.ndarray, n_labels: int, device: str = "cpu"):
        super().__init__(vectors, device)
        from mailroute.label_index import exemplar_slots

        slots = exemplar_slots(labels, n_labels, empty=self.ntotal)  # ntotal: an empty slot (a -inf row is appended there)
        self.slots = torch.from_numpy(slots).to(self.device)  # (labels, slots) exemplar rows of each label

    @torch.inference_mode()
    def label_means(self, xq: np.ndarray, top_n: int, exclude: np.ndarray = None) -> np.ndarray:
        """(n, dim) emails -> (n, labels) mean of each label's top_n exemplar cosines (of fewer where the
        label has fewer; 0 where it has none: LabelIndex scores those by their description). exclude: optional (n,)
        exemplar row per email that does not exist for it (-1 none)."""
        q = torch.from_numpy(np.ascontiguousarray(xq, dtype=np.float32)).to(self.device)
        L, M = self.slots.shape
        n_top = min(int(top_n), M)
        step = max(1, self.CHUNK_ELEMENTS // (L * M))
        out = []
        for s in range(0, len(q), step):
            sims = q[s:s + step] @ self.xb.T  # (c, ntotal)
            sims = torch.cat([sims, sims.new_full((len(sims), 1), float("-inf"))], 1)  # the empty slot's column
            if exclude is not None:
                rows = torch.from_numpy(np.asarray(exclude[s:s + step], dtype=np.int64)).to(self.device)
                hit = rows >= 0
                sims[torch.arange(len(sims), device=self.device)[hit], rows[hit]] = float("-inf")
            top = sims[:, self.slots].topk(n_top, dim=-1).values  # (c, labels, n_top)
            found = torch.isfinite(top)
            out.append(torch.where(found, top, 0).sum(-1) / found.sum(-1).clamp(min=1))
        return torch.cat(out).double().cpu().numpy() if out else np.zeros((0, L))
