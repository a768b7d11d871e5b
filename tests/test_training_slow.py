"""The whole `mailroute train` on a small BANKING77 sample with the real MiniLM weights (a few minutes on 2 cores)."""

import json

import pytest

from mailroute.label_index import CARDS_FILE, EXEMPLAR_INDEX_FILE, INDEX_FILE
from mailroute.repository import WEIGHTS_FILE
from mailroute.run_layout import RunFolder
from mailroute.settings import banking77_dir
from training.run import TrainConfig, run

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not banking77_dir().is_dir(), reason=f"BANKING77 is not at {banking77_dir()}: set MAILROUTE_BANKING77 "
                                                                      f"or MAILROUTE_SHARED (read in place, never part of a clone)")]


def test_train_both_stages_beats_chance_and_writes_the_report(tmp_path):
    # Given 6 training emails of each of the 77 intents and 300 test emails
    cfg = TrainConfig(dataset="banking77", out=str(tmp_path / "run"), sample_per_label=6, test_limit=300,
                      bi_epochs=1, bi_batch_size=32, k_train=4, k_eval=4, ce_epochs=0.5, ce_batch_size=8, flat_epochs=1)
    # When both stages (and the flat baseline) train
    m = run(cfg)
    # Then accuracy is far above chance (1/77) for every system, and the run is saved with its config
    chance = 1 / 77
    assert m["two_stage"]["accuracy"] > 10 * chance
    assert m["bi_encoder"]["accuracy"] > 10 * chance
    assert m["retrieval"]["recall@10"] >= m["retrieval"]["recall@1"]
    assert 0 <= m["two_stage"]["ece"] <= 1 and "flat_baseline" in m
    out = RunFolder(tmp_path / "run")
    assert json.loads(out.config.read_text())["sample_per_label"] == 6
    assert json.loads(out.metrics.read_text())["n_train"] == 77 * 6
    report = out.report.read_text()
    assert "| two-stage (K=4, gated) |" in report and "closest label pairs" in report
    for part in (out.bi_encoder / WEIGHTS_FILE, out.cross_encoder / WEIGHTS_FILE, out.label_index / INDEX_FILE,
                 out.label_index / EXEMPLAR_INDEX_FILE, out.label_index / CARDS_FILE, out.policy, out.abstention_plot):
        assert part.exists(), part
    # the policy saved is the one the metrics were measured with, and every variant was measured on both splits
    assert json.loads(out.policy.read_text()) == m["policy"]
    assert set(m["variants"]["validation"]) == set(m["variants"]["test"]) >= {"bi_encoder", "two_stage", "two_stage_ungated"}
    assert 0.0 <= m["two_stage"]["share_reranked"] <= 1.0
