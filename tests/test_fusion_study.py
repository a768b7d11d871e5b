"""benchmarks/fusion_study.py --flat: the flat baseline as one more fusion feature, on a tiny trained run."""

import json
import shutil

import numpy as np
import pytest

from mailroute.run_layout import RunFolder
from training.config import TrainConfig


@pytest.mark.slow
def test_flat_feature_joins_the_fusion_rules_and_is_cached_in_the_run(tmp_path, capsys, monkeypatch):
    # Given a tiny trained run
    from benchmarks import fusion_study
    from tiny_encoders import make_tiny_base
    from training.run import run

    base = make_tiny_base(tmp_path / "base")
    out = tmp_path / "run"
    run(TrainConfig(dataset="demo", out=str(out), base=str(base), bi_epochs=0.2, ce_epochs=0.2, skip_baseline=True,
                    test_limit=40, top_n_grid="3", description_weight_grid="0"))
    # When the study adds a 1-epoch flat baseline trained on the run's training emails
    args = ["--run", str(out), "--k", "5", "--flat", "1", "--base", str(base), "--device", "cpu"]
    assert fusion_study.main([*args, "--json", str(tmp_path / "t.json")]) == 0
    rows = {r["rule"]: r for r in json.loads((tmp_path / "t.json").read_text())}
    # Then both ensembles are fitted on validation, read on test, and compared with the flat system on the same emails
    for rule in ("retrieval + flat, K=5", "CE + retrieval + flat, K=5"):
        assert rows[rule]["features"][-1] == "flat" and len(rows[rule]["weights"]) == len(rows[rule]["features"])
        c = rows[rule]["test_vs_flat"]
        assert c["accuracy_a"] == pytest.approx(rows[rule]["test"])
    z = np.load(RunFolder(out).study_flat(1))
    assert z["test"].shape == (40, 50) and np.allclose(z["val"].sum(1), 1, atol=1e-4)
    # the flat side of the comparison is the flat system itself: its top-1 over every label
    flat_test = float(np.mean(z["test"].argmax(1) == z["test_gold"]))
    assert rows["CE + retrieval + flat, K=5"]["test_vs_flat"]["accuracy_b"] == pytest.approx(flat_test)
    assert f"flat baseline alone on test: {flat_test:.2%}" in capsys.readouterr().out
    # and a second call reads the cached probabilities instead of training again
    monkeypatch.setattr("training.run.train_flat_baseline", lambda *a, **kw: pytest.fail("trained again"))
    assert fusion_study.main([*args, "--json", str(tmp_path / "t2.json")]) == 0
    assert json.loads((tmp_path / "t2.json").read_text()) == json.loads((tmp_path / "t.json").read_text())
    # a flat baseline of no epochs is refused before any work
    with pytest.raises(SystemExit):
        fusion_study.main(["--run", str(out), "--flat", "0"])
    with pytest.raises(SystemExit):
        fusion_study.main(["--run", str(out), "--flat", "1", "--base", str(tmp_path / "no-model-here")])
    # and so is one of other settings: its cache would answer for another model
    with pytest.raises(SystemExit, match="other settings"):
        fusion_study.main([*args[:-4], "--base", str(shutil.copytree(base, tmp_path / "other-base")), "--device", "cpu"])
