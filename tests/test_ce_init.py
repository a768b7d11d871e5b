"""`--ce-init`: where the cross-encoder's training starts (a new one-logit head on each)."""

import json

import pytest
import torch

from mailroute.settings import BadSetting
from training.models import HF_CONFIG_FILE


def test_ce_init_flat_needs_flat_epochs_even_with_skip_baseline(tmp_path):
    from training.config import TrainConfig
    from training.run import run

    with pytest.raises(BadSetting, match=r"--flat-epochs must be >= 1"):
        run(TrainConfig(dataset="demo", out=str(tmp_path / "run"), ce_init="flat", skip_baseline=True, flat_epochs=0))


def test_ce_init_flat_starts_the_cross_encoder_from_the_trained_flat_encoder(tmp_path, monkeypatch):
    """The flat baseline is trained before stage 2, its encoder saved in the run folder and loaded as the cross-encoder's
    start (not the base weights); it is still reported as the baseline, once, even with --skip-baseline."""
    import training.run as train_run
    from mailroute.run_layout import RunFolder
    from tiny_encoders import make_tiny_base
    from training.config import TrainConfig
    from training.models import load_cross_encoder

    base = make_tiny_base(tmp_path / "base")
    started = {}

    def recording_loader(path=None, **kw):  # the real loader; remembers where it started and the weights it started with
        model = load_cross_encoder(path, **kw)
        started["path"] = path
        started["embeddings"] = model.model.get_input_embeddings().weight.detach().clone()
        return model

    monkeypatch.setattr(train_run, "load_cross_encoder", recording_loader)
    flat_runs = []
    real_train_flat = train_run.train_flat
    monkeypatch.setattr(train_run, "train_flat", lambda *a, **kw: flat_runs.append(1) or real_train_flat(*a, **kw))
    m = train_run.run(TrainConfig(dataset="demo", out=str(tmp_path / "run"), base=str(base), ce_init="flat", skip_baseline=True,
                                  bi_epochs=0.2, ce_epochs=0.2, flat_epochs=1, test_limit=20, k_train=3, k_eval=3))
    out = RunFolder(tmp_path / "run")
    assert started["path"] == out.flat_encoder and (out.flat_encoder / HF_CONFIG_FILE).is_file()
    from sentence_transformers import SentenceTransformer

    flat_encoder = SentenceTransformer(str(out.flat_encoder), device="cpu")
    base_encoder = SentenceTransformer(str(base), device="cpu")
    flat_emb = flat_encoder[0].auto_model.get_input_embeddings().weight
    assert torch.equal(started["embeddings"], flat_emb)  # the flat encoder's weights, trained: not the base's
    assert not torch.equal(flat_emb, base_encoder[0].auto_model.get_input_embeddings().weight)
    assert len(flat_runs) == 1 and "flat_baseline" in m and m["flat_baseline"]["epochs"] == 1
    assert json.loads(out.config.read_text())["ce_init"] == m["cross_encoder_start"] == "flat"
    assert "started from the flat weights (--ce-init)" in out.report.read_text()  # the comparison with flat says so
    assert m["train_time"]["flat_baseline_s"] > 0
