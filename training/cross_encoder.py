"""Stage 2: the cross-encoder, trained listwise over each email's mined K candidates."""

import tempfile

from datasets import Dataset
from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments

from training.listwise_loss import ListwiseSoftmaxCrossEntropyLoss


def train_cross_encoder(model, rows: dict, epochs: float, batch_size: int, lr: float, seed: int, prior_scale: float = 0.0):
    """batch_size counts emails; each brings its K pairs."""
    args = CrossEncoderTrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="mailroute-ce-"), num_train_epochs=epochs, per_device_train_batch_size=batch_size,
        learning_rate=lr, warmup_steps=0.1, seed=seed, data_seed=seed, save_strategy="no", logging_steps=50,
        report_to="none", use_cpu=True, dataloader_num_workers=0,
    )
    loss = ListwiseSoftmaxCrossEntropyLoss(model, prior_scale=prior_scale)
    CrossEncoderTrainer(model=model, args=args, train_dataset=Dataset.from_dict(rows), loss=loss).train()
    return model
