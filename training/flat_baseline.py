"""The baseline to beat: the same MiniLM with a linear head over all labels, trained with plain
cross-entropy on the same data and a comparable budget."""

import copy
import random

import numpy as np
import torch
from sentence_transformers.util import batch_to_device
from torch import nn
from tqdm.auto import tqdm

from mailroute.flat_head import LOGIT_SCALE, FlatHead
from mailroute.settings import DEFAULTS
from training.models import autocast_dtype


class FlatClassifier(nn.Module):
    def __init__(self, encoder, n_labels: int):
        super().__init__()
        self.encoder = encoder  # a SentenceTransformer (transformer + mean pooling + normalise)
        self.head = nn.Linear(encoder.get_embedding_dimension(), n_labels)

    def forward(self, texts: list) -> torch.Tensor:
        features = batch_to_device(self.encoder.preprocess(texts), self.head.weight.device)
        emb = self.encoder(features)["sentence_embedding"]  # (batch, dim)
        return self.head(emb) * LOGIT_SCALE

    def flat_head(self, labels, encoder_id: str) -> FlatHead:
        """The head as served (numpy, beside the label index), pinned to the encoder weights it was trained with."""
        return FlatHead(self.head.weight.detach().float().cpu().numpy().astype(np.float64),
                        self.head.bias.detach().float().cpu().numpy().astype(np.float64), LOGIT_SCALE, tuple(labels), encoder_id)


def train_flat(encoder, examples: list, taxonomy, epochs: int, batch_size: int, lr: float, seed: int, val: list = (),
               device: str = "cpu", precision: str = "auto") -> tuple:
    """-> (model, validation accuracy after each epoch). With validation emails, the epoch with the best
    validation accuracy is kept (the same early stopping the two-stage system gets)."""
    torch.manual_seed(seed)
    model = FlatClassifier(encoder, len(taxonomy)).to(device)
    opt = torch.optim.AdamW([{"params": model.encoder.parameters(), "lr": lr}, {"params": model.head.parameters(), "lr": lr * 50}])
    y = [taxonomy.index(e.label) for e in examples]
    rng = random.Random(seed)
    order = list(range(len(examples)))
    steps = epochs * ((len(order) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * max(0.0, 1 - s / steps))
    model.train()
    val_acc, best = [], None
    dtype = autocast_dtype(device, precision)
    amp = torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None)
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)  # fp16 gradients underflow unscaled
    with tqdm(total=steps, desc="flat baseline") as bar:
        for _ in range(epochs):
            rng.shuffle(order)
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                with amp:
                    logits = model([examples[i].text for i in idx]).float()  # (batch, labels)
                loss = nn.functional.cross_entropy(logits, torch.tensor([y[i] for i in idx], device=logits.device))
                opt.zero_grad()
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if val:
                model.eval()
                acc = float(np.mean(predict_flat(model, [e.text for e in val]).argmax(1) == [taxonomy.index(e.label) for e in val]))
                val_acc.append(acc)
                if acc >= max(val_acc):
                    best = copy.deepcopy(model.state_dict())
                model.train()
    if best is not None:
        model.load_state_dict(best)
    model.eval()
    return model, val_acc


@torch.no_grad()
def predict_flat(model: FlatClassifier, texts: list, batch_size: int = DEFAULTS.embed_batch) -> np.ndarray:
    """-> (n, labels) probabilities."""
    out = [torch.softmax(model(texts[s:s + batch_size]).float(), dim=-1).cpu().numpy() for s in range(0, len(texts), batch_size)]
    return np.concatenate(out)
