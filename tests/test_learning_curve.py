"""benchmarks/learning_curve.py: runs that differ in training emails a label, read into one table and plot."""

import json
from dataclasses import asdict

import pytest

from benchmarks import learning_curve
from mailroute.rerank_policy import RerankPolicy
from mailroute.run_layout import RunFolder
from training.config import TrainConfig


def _run(folder, n_train, served_right, flat_right, ce_weight=2.0, temperature=4.0, flat_weight=0.5, seed=12, gold=("a", "b") * 5):
    """A run folder as `mailroute train` leaves it, with what the curve reads: config, metrics, predictions, policy."""
    run = RunFolder(folder)
    run.root.mkdir(parents=True)
    run.config.write_text(json.dumps(asdict(TrainConfig(dataset="banking77", sample_per_label=n_train // 2, seed=seed))))
    rows = [{"gold": g, "label": g if i < served_right else "x", "flat_label": g if i < flat_right else "y"}
            for i, g in enumerate(gold)]
    run.predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    test = {name: {"accuracy": acc} for name, acc in (("bi_encoder_descriptions", 0.5), ("bi_encoder", 0.6),
                                                      ("cross_encoder_only", 0.4), ("retrieval_flat", 0.7),
                                                      ("two_stage", served_right / 10))}
    run.metrics.write_text(json.dumps({
        "labels": 2, "n_train": n_train, "n_validation": 30, "n_test": 10, "variants": {"test": test},
        "flat_baseline": {"accuracy": flat_right / 10}, "two_stage": {"share_reranked": 0.2},
        "train_time": {"bi_encoder_s": 60.0, "cross_encoder_s": 100.0, "evaluation_s": 20.0}}))
    RerankPolicy(retrieval_weight=3.0, ce_weight=ce_weight, temperature=temperature, flat_weight=flat_weight).save(run.policy)
    return folder


def test_learning_curve_orders_runs_by_training_emails_and_pairs_served_with_flat(tmp_path):
    # Given two runs of one split, the larger named first: 20 and 100 training emails over 2 labels
    big = _run(tmp_path / "n50", 100, served_right=9, flat_right=6)
    small = _run(tmp_path / "n10", 20, served_right=5, flat_right=7, flat_weight=0.0)
    # When the curve is drawn from them
    learning_curve.main(["--runs", str(big), str(small), "--out", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    # Then the points run from fewer to more emails a label, with every system's test accuracy
    first, second = summary["points"]
    assert [first["emails_per_label"], second["emails_per_label"]] == [10, 50]
    assert first["accuracy"]["flat"] == 0.7 and first["accuracy"]["two_stage"] == 0.5 and second["accuracy"]["bi_encoder"] == 0.6
    # and served vs flat is paired on the same emails: the larger run is right on 3 emails flat misses, never the reverse
    assert second["served_vs_flat"]["only_a_right"] == 3 and second["served_vs_flat"]["only_b_right"] == 0
    assert second["served_vs_flat"]["difference"] == pytest.approx(0.3)
    assert first["served_vs_flat"]["difference"] == pytest.approx(-0.2)
    # and what the policy kept: the cross-encoder's weight per logit unit, and whether flat is fused
    assert second["ce_logit_coefficient"] == pytest.approx(0.5) and second["flat_fused"] and not first["flat_fused"]
    assert first["run_minutes"] == pytest.approx(3.0)
    table = (tmp_path / "out" / "summary.md").read_text()
    assert "| served (gated) | 50.00% | 90.00% |" in table and "| flat classifier fused (validation's choice) | no | yes |" in table
    assert (tmp_path / "out" / "learning_curve.png").stat().st_size > 1000


def test_learning_curve_refuses_runs_of_different_splits_or_unfinished_folders(tmp_path):
    # Given a run, one of another seed (another validation split), one over other test emails, a folder that holds no
    # finished run, and one whose metrics were cut off
    a = _run(tmp_path / "a", 20, 5, 5)
    other_seed = _run(tmp_path / "seed13", 40, 5, 5, seed=13)
    other_test = _run(tmp_path / "test", 40, 5, 5, gold=("b", "a") * 5)
    (tmp_path / "empty").mkdir()
    cut = _run(tmp_path / "cut", 40, 5, 5)
    RunFolder(cut).metrics.write_text('{"labels": 2, "n_tr')
    # Then each is refused with one line naming the folder and what is wrong, and nothing is written
    for other, why in ((other_seed, "seed13 and .* do not share one split: they differ in seed"),
                       (other_test, "test and .* do not share one split: their test emails differ"),
                       (tmp_path / "empty", "empty: no metrics.json nor predictions.jsonl nor config.json"),
                       (cut, "cut: metrics.json cannot be read")):
        with pytest.raises(SystemExit, match=why):
            learning_curve.main(["--runs", str(a), str(other), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
