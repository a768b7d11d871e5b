"""The baseline to beat: the same MiniLM with a linear head over all labels, trained with plain
cross-entropy on the same data and a comparable budget."""

import random

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm


class FlatClassifier(nn.Module):
    def __init__(self, encoder, n_labels: int):
        super().__init__()
        self.encoder = encoder  # a SentenceTransformer (transformer + mean pooling + normalise)
        self.head = nn.Linear(encoder.get_embedding_dimension(), n_labels)

    def forward(self, texts: list) -> torch.Tensor:
        features = self.encoder.preprocess(texts)
        emb = self.encoder(features)["sentence_embedding"]  # (batch, dim)
        return self.head(emb) * 20.0  # normalised embeddings: the scale lets logits be confident (as MNRL's)


def train_flat(encoder, examples: list, taxonomy, epochs: int, batch_size: int, lr: float, seed: int) -> FlatClassifier:
    torch.manual_seed(seed)
    model = FlatClassifier(encoder, len(taxonomy))
    opt = torch.optim.AdamW([{"params": model.encoder.parameters(), "lr": lr}, {"params": model.head.parameters(), "lr": lr * 50}])
    y = [taxonomy.index(e.label) for e in examples]
    rng = random.Random(seed)
    order = list(range(len(examples)))
    steps = epochs * ((len(order) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * max(0.0, 1 - s / steps))
    model.train()
    with tqdm(total=steps, desc="flat baseline") as bar:
        for _ in range(epochs):
            rng.shuffle(order)
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                logits = model([examples[i].text for i in idx])  # (batch, labels)
                loss = nn.functional.cross_entropy(logits, torch.tensor([y[i] for i in idx]))
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model


@torch.no_grad()
def predict_flat(model: FlatClassifier, texts: list, batch_size: int = 64) -> np.ndarray:
    """-> (n, labels) probabilities."""
    out = [torch.softmax(model(texts[s:s + batch_size]), dim=-1).numpy() for s in range(0, len(texts), batch_size)]
    return np.concatenate(out)
