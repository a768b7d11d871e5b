"""Stage 2: the cross-encoder, trained listwise over each email's mined K candidates."""

import tempfile

from datasets import Dataset
from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments

from mailroute.rerank_policy import RerankPolicy
from training.bi_encoder import trainer_device_args
from training.listwise_loss import ListwiseSoftmaxCrossEntropyLoss


def train_cross_encoder(model, rows: dict, epochs: float, batch_size: int, lr: float, seed: int, policy: RerankPolicy = None,
                        device: str = "cpu", callbacks: list = None):
    """batch_size counts emails; each brings its K pairs. callbacks: transformers TrainerCallbacks
    (the run uses one to evaluate on validation after every epoch)."""
    with tempfile.TemporaryDirectory(prefix="mailroute-ce-") as tmp:
        args = CrossEncoderTrainingArguments(
            output_dir=tmp, num_train_epochs=epochs, per_device_train_batch_size=batch_size,
            learning_rate=lr, warmup_steps=0.1, seed=seed, data_seed=seed, save_strategy="no", logging_steps=50,
            report_to="none", dataloader_num_workers=0, **trainer_device_args(device),
        )
        loss = ListwiseSoftmaxCrossEntropyLoss(model, policy=policy)
        CrossEncoderTrainer(model=model, args=args, train_dataset=Dataset.from_dict(rows), loss=loss, callbacks=callbacks).train()
    return model
