"""benchmarks/served_agreement.py against the real tritonserver: a run trained by `mailroute train` (tiny encoders),
exported, served; every answer equals the run's evaluation, and a changed prediction is found and fails the script."""

import json

import pytest

@pytest.mark.slow
def test_the_server_answers_what_the_run_measured_and_a_difference_fails(tmp_path):
    from benchmarks.served_agreement import main
    from client.server import TritonServer
    from export.run import ExportConfig, export
    from mailroute.run_layout import RunFolder
    from tiny_encoders import make_tiny_base
    from training.config import TrainConfig
    from training.run import run

    base = make_tiny_base(tmp_path / "base")
    run(TrainConfig(dataset="demo", out=str(tmp_path / "run"), base=str(base), bi_epochs=0.2, ce_epochs=0.2, flat_epochs=1,
                    test_limit=24, k_train=3, k_eval=3, flat_fusion="always"))  # tiny weights: auto might not fuse it
    out = RunFolder(tmp_path / "run")
    export(ExportConfig(run=str(out.root), repo=str(tmp_path / "repo")))  # top_k 0: the K the run was evaluated with
    with TritonServer(tmp_path / "repo") as server:
        assert main(["--run", str(out.root), "--url", server.grpc_url, "--batch", "10", "--json", str(tmp_path / "a.json")]) == 0
        summary = json.loads((tmp_path / "a.json").read_text())
        assert summary["n"] == summary["equal"] == 24 and summary["accuracy_served"] == summary["accuracy_measured"]
        assert summary["model_versions"]["flat_encoder"] == "1"  # the served answer fuses the flat classifier, as measured
        # one measured answer changed: the script names the row and fails
        rows = [json.loads(line) for line in out.predictions.read_text().splitlines()]
        rows[5]["label"] = next(r["label"] for r in rows if r["label"] != rows[5]["label"])
        out.predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert main(["--run", str(out.root), "--url", server.grpc_url, "--limit", "8", "--json", str(tmp_path / "b.json")]) == 1
        summary = json.loads((tmp_path / "b.json").read_text())
        assert summary["n"] == 8 and summary["equal"] == 7 and [d["row"] for d in summary["first_differences"]] == [5]


def test_bad_arguments_are_named(tmp_path, capsys):
    from benchmarks.served_agreement import main

    with pytest.raises(SystemExit):
        main(["--run", str(tmp_path), "--url", "127.0.0.1:1", "--limit", "-1"])
    assert "--limit must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not found: is .* a trained run"):
        main(["--run", str(tmp_path), "--url", "127.0.0.1:1"])


def test_a_server_that_does_not_answer_is_named(tmp_path, monkeypatch):
    """A run whose predictions exist but whose --url serves nothing: one line naming the address, no traceback."""
    import shutil

    from client.classifier_client import ClassifierClient

    from benchmarks.served_agreement import main
    from mailroute.run_layout import RunFolder
    from tiny_encoders import make_tiny_base
    from training.config import TrainConfig
    from training.run import run

    base = make_tiny_base(tmp_path / "base")
    run(TrainConfig(dataset="demo", out=str(tmp_path / "run"), base=str(base), bi_epochs=0.1, ce_epochs=0.1, flat_epochs=1,
                    test_limit=4, k_train=3, k_eval=3))
    shutil.rmtree(tmp_path / "base")
    monkeypatch.setattr(ClassifierClient, "_delay", lambda self, attempt: 0.0)  # the retries still happen, without their backoff
    with pytest.raises(SystemExit, match="the classifier at 127.0.0.1:1 did not answer"):
        main(["--run", str(RunFolder(tmp_path / "run").root), "--url", "127.0.0.1:1"])
