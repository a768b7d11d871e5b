"""Listwise softmax cross-entropy over the K retrieved candidates of each email."""

import torch
from sentence_transformers.util import batch_to_device
from torch import Tensor, nn

from mailroute.rerank_policy import RerankPolicy


def listwise_softmax_ce(logits: Tensor, gold: Tensor, mask: Tensor = None) -> Tensor:
    """Mean over emails of -log softmax(logits)[gold].

    Args:
        logits: (batch, k) raw cross-encoder scores of each email's candidates.
        gold: (batch,) index of the correct candidate in each row.
        mask: optional (batch, k) bool, False where a row has fewer than k candidates.
    """
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))  # padded candidates get no probability
    return nn.functional.cross_entropy(logits, gold)


class ListwiseSoftmaxCrossEntropyLoss(nn.Module):
    """Softmax cross-entropy of each email's K candidate logits against the gold candidate.

    This is exactly the inference computation (softmax over the K reranked candidates) turned into a
    loss, so training mirrors serving. It is deliberately not ListNetLoss (which with one-hot labels
    softmaxes the labels too: a -inf/0 target, not one-hot CE) and not the cross-encoder
    MultipleNegativesRankingLoss (which adds random in-batch negatives the classifier never sees).

    Optionally each candidate's logit is fused with its retrieval score by a RerankPolicy: the same
    formula the pipeline applies at inference (`RerankPolicy.fused`), so the cross-encoder can learn a
    correction to retrieval instead of starting from nothing (retrieval_weight 0 = pure rerank).

    Args:
        model: a CrossEncoder with one output label and an identity activation.
        policy: the rerank policy whose formula fuses logits and retrieval scores (default: logits only).
        mini_batch_size: pairs per forward pass (memory bound); None = all pairs of the batch at once.

    References:
        Cao et al., 2007, "Learning to Rank: From Pairwise Approach to Listwise Approach" (the listwise
        family); here the target is the single gold label.

    Inputs:
        (email, [label text 1, ..., label text K], optional [retrieval score 1, ..., K]) with labels
        [0, ..., 1, ..., 0] (exactly one 1).

    Example:
        ::
            loss = ListwiseSoftmaxCrossEntropyLoss(cross_encoder)
            dataset = Dataset.from_dict({"query": [email], "docs": [[t1, t2, t3]], "labels": [[0, 1, 0]]})
            CrossEncoderTrainer(model=cross_encoder, train_dataset=dataset, loss=loss).train()
    """

    def __init__(self, model, policy: RerankPolicy = None, mini_batch_size: int = None):
        super().__init__()
        self.policy = policy or RerankPolicy()
        if model.num_labels != 1:
            raise ValueError(f"{self.__class__.__name__} expects a model with 1 output label, but got {model.num_labels}")
        self.model = model
        self.mini_batch_size = mini_batch_size

    def forward(self, inputs: list, labels: list, **kwargs) -> Tensor:
        if len(inputs) not in (2, 3):
            raise ValueError(f"{self.__class__.__name__} expects inputs (queries, docs_list[, retrieval]), but got {len(inputs)} inputs")
        queries, docs_list = inputs[:2]
        retrieval = inputs[2] if len(inputs) == 3 else None
        k_per_query = [len(docs) for docs in docs_list]
        gold = []
        for i, row in enumerate(labels):
            row = torch.as_tensor(row)
            if len(row) != k_per_query[i] or int((row == 1).sum()) != 1:
                raise ValueError(f"{self.__class__.__name__} expects exactly one gold candidate per email, but row {i} has labels {row.tolist()}")
            gold.append(int(row.argmax()))
        pairs = [(q, d) for q, docs in zip(queries, docs_list) for d in docs]
        step = self.mini_batch_size or len(pairs)
        scores = []
        for s in range(0, len(pairs), step):
            tokens = batch_to_device(self.model.preprocess(pairs[s:s + step]), self.model.device)
            scores.append(self.model(tokens)["scores"].view(-1))
        pair_logits = torch.cat(scores).float()  # (sum of k,): the cross-encoder's logit of every (email, candidate) pair
        k = max(k_per_query)
        logits = pair_logits.new_zeros(len(queries), k)  # (batch, k)
        mask = torch.zeros(len(queries), k, dtype=torch.bool, device=pair_logits.device)
        start = 0
        for i, n in enumerate(k_per_query):
            row = pair_logits[start:start + n]  # (k_i,)
            if retrieval is not None:
                row = self.policy.fused(row, torch.as_tensor(retrieval[i], dtype=pair_logits.dtype, device=pair_logits.device))
            else:
                row = self.policy.fused(row, torch.zeros_like(row))
            logits[i, :n] = row
            mask[i, :n] = True
            start += n
        return listwise_softmax_ce(logits, torch.tensor(gold, device=pair_logits.device), mask)

    def get_config_dict(self) -> dict:
        return {"policy": self.policy.to_dict(), "mini_batch_size": self.mini_batch_size}
