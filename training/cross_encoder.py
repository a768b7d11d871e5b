"""Stage 2: the cross-encoder, trained listwise over each email's mined K candidates."""

import copy
import tempfile

import numpy as np
from datasets import Dataset
from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
from transformers import TrainerCallback

from mailroute.rerank_policy import RerankPolicy
from mailroute.settings import DEFAULTS
from training.models import drop_autocast_wrapper, trainer_precision_args
from training.listwise_loss import ListwiseSoftmaxCrossEntropyLoss


def train_cross_encoder(model, rows: dict, epochs: float, batch_size: int, lr: float, seed: int, policy: RerankPolicy = None,
                        device: str = "cpu", callbacks: list = None, precision: str = "auto"):
    """batch_size counts emails; each brings its K pairs. callbacks: transformers TrainerCallbacks
    (the run uses one to evaluate on validation after every epoch)."""
    with tempfile.TemporaryDirectory(prefix="mailroute-ce-") as tmp:
        args = CrossEncoderTrainingArguments(
            output_dir=tmp, num_train_epochs=epochs, per_device_train_batch_size=batch_size,
            learning_rate=lr, warmup_steps=0.1, seed=seed, data_seed=seed, save_strategy="no", logging_steps=50,
            report_to="none", dataloader_num_workers=0, **trainer_precision_args(device, precision),
        )
        loss = ListwiseSoftmaxCrossEntropyLoss(model, policy=policy)
        CrossEncoderTrainer(model=model, args=args, train_dataset=Dataset.from_dict(rows), loss=loss, callbacks=callbacks).train()
    drop_autocast_wrapper(model)
    return model


def listwise_accuracy(model, rows: dict, policy: RerankPolicy = None, batch_size: int = DEFAULTS.score_batch) -> float:
    """Share of rows whose gold candidate gets the highest score: the cross-encoder logit alone, or, given a policy and
    rows with "retrieval" scores, the policy's fusion of both: what a cross-encoder trained with a retrieval weight
    (ListwiseSoftmaxCrossEntropyLoss with that policy) is trained to rank."""
    pairs = [(q, d) for q, docs in zip(rows["query"], rows["docs"]) for d in docs]
    scores = np.asarray(model.predict(pairs, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True)).reshape(-1)
    retrieval = rows.get("retrieval") if policy is not None else None
    if policy is not None and policy.retrieval_weight and retrieval is None:  # would judge the logit alone, silently
        raise ValueError(f"listwise_accuracy: the policy weighs retrieval scores ({policy.retrieval_weight:g}) but the rows have none")
    hits, start = [], 0
    for i, (docs, labels) in enumerate(zip(rows["docs"], rows["labels"])):
        row = scores[start:start + len(docs)]
        if retrieval is not None:
            row = policy.fused(row, np.asarray(retrieval[i], np.float64))
        hits.append(int(np.argmax(row)) == labels.index(1))
        start += len(docs)
    return float(np.mean(hits))


class KeepBestEpoch(TrainerCallback):
    """Early stopping by epochs: after every epoch, the listwise accuracy on validation rows (mined like training
    rows) of what training ranks: the cross-encoder alone, or with `policy` its fusion with the rows' retrieval
    scores (a cross-encoder trained as a correction to retrieval is judged as one); `restore()` puts back the
    weights of the best epoch."""

    def __init__(self, model, validation_rows: dict, first_epoch: int = 1, policy: RerankPolicy = None):
        self.model, self.rows, self.first_epoch = model, validation_rows, first_epoch  # resume counts its starting weights as 0
        self.policy = policy
        self.history, self.best = [], None

    def on_epoch_end(self, args, state, control, **kwargs):
        self.model.model.eval()
        acc = listwise_accuracy(self.model, self.rows, self.policy)
        self.model.model.train()
        self.history.append(acc)
        if acc >= max(self.history):
            self.best = {k: v.detach().cpu().clone() for k, v in self.model.model.state_dict().items()}
        print(f"cross-encoder epoch {len(self.history) - 1 + self.first_epoch}: validation listwise accuracy {acc:.2%}")

    def restore(self) -> list:
        if self.best is not None:
            self.model.model.load_state_dict(copy.deepcopy(self.best))
        return self.history
