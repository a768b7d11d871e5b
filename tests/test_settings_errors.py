"""Settings and user errors: one default each, refused early with a message that names the setting."""

import json
import subprocess
import sys

import pytest

from mailroute import contract
from mailroute.settings import ROOT, BadSetting
from stand_ins import empty_repository, launch_instead

# a training-only machine: no SQLAlchemy (feedback store) and no tritonclient (server, model repository tools).
# None in sys.modules makes `import` fail and find_spec answer None, as for a package not installed
WITHOUT_SERVING_PACKAGES = """
import sys

sys.modules["sqlalchemy"] = sys.modules["tritonclient"] = None
from mailroute.cli import main
main(sys.argv[1:])
"""


def test_a_user_error_is_one_line_on_a_machine_without_serving_packages(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", WITHOUT_SERVING_PACKAGES, "train", "--rerank-budget", "25", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mailroute train: ") and "--rerank-budget" in lines[0], r.stderr
    assert not out.exists()


@pytest.mark.parametrize("fraction", [0, 1, 10, -0.1])
def test_a_validation_fraction_outside_0_1_is_refused_before_any_work(tmp_path, fraction):
    from training.config import TrainConfig
    from training.run import run

    with pytest.raises(BadSetting, match=r"--validation-fraction must be a share in \(0, 1\)"):
        run(TrainConfig(dataset="demo", out=str(tmp_path / "run"), validation_fraction=fraction))
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_run_config_with_a_removed_setting_is_refused_by_name(tmp_path):
    from training.config import TrainConfig

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"dataset": "demo", "k_eval": 7, "train_prior_scale": 0.5, "prior_grid": "0,1"}))
    with pytest.raises(BadSetting) as err:
        TrainConfig.load(path)
    message = str(err.value)
    assert str(path) in message and "['prior_grid', 'train_prior_scale']" in message  # the file and what it should not have
    assert "k_eval" in message and "rerank_budget" in message  # and what it may have


def test_a_run_config_reads_back_and_missing_settings_take_the_defaults(tmp_path):
    from dataclasses import asdict

    from training.config import TrainConfig

    path = tmp_path / "config.json"
    cfg = TrainConfig(dataset="banking77", k_train=3, k_eval=4, rerank_budget=0.1)
    path.write_text(json.dumps(asdict(cfg)))
    assert TrainConfig.load(path) == cfg
    path.write_text(json.dumps({"dataset": "demo"}))  # e.g. a run made before rerank_budget existed
    assert TrainConfig.load(path) == TrainConfig(dataset="demo")
    path.write_text("{not json")
    with pytest.raises(BadSetting, match="not valid JSON"):
        TrainConfig.load(path)


def test_commands_share_one_default_repository_run_folder_and_k():
    from export.config import ExportConfig
    from mailroute.settings import DEFAULT_REPOSITORY, DEFAULT_RUN, DEFAULTS
    from training.config import TrainConfig
    from training.feedback_config import FeedbackConfig

    assert ExportConfig().repo == FeedbackConfig().repo == str(DEFAULT_REPOSITORY)
    assert ExportConfig().run == TrainConfig().out == str(DEFAULT_RUN)  # export reads what train wrote
    assert TrainConfig().k_train == TrainConfig().k_eval == DEFAULTS.top_k


def test_the_shared_folder_named_by_the_environment_wins(monkeypatch, tmp_path):
    from mailroute.settings import banking77_dir, shared_dir

    monkeypatch.setenv("MAILROUTE_SHARED", str(tmp_path))
    monkeypatch.delenv("MAILROUTE_BANKING77", raising=False)
    assert shared_dir() == tmp_path and banking77_dir() == tmp_path / "datasets" / "banking77"  # the dataset follows it
    monkeypatch.setenv("MAILROUTE_BANKING77", str(tmp_path / "b77"))
    assert banking77_dir() == tmp_path / "b77"  # unless named on its own


def _serve(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "mailroute.cli", "serve", *args, "--ready-port", "-1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


@pytest.mark.parametrize("layout", ["empty", "missing", "no classifier"])
def test_serve_on_a_wrong_repository_is_one_line_naming_it_before_any_launch(tmp_path, layout):
    repo = tmp_path / "repo"
    if layout != "missing":
        repo.mkdir()
    if layout == "no classifier":
        (repo / contract.BI_ENCODER).mkdir()
        (repo / contract.CROSS_ENCODER).mkdir()
    r = _serve("--repo", str(repo))
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mailroute serve: model repository ") and str(repo.resolve()) in lines[0], r.stderr
    if layout != "missing":
        assert "email_classifier" in lines[0]
    assert "starting tritonserver" not in r.stdout  # refused before launch


def test_serve_on_a_port_in_use_names_the_port_and_launches_nothing(tmp_path, monkeypatch):
    import socket

    from client.server import ServerStartError, TritonServer

    monkeypatch.setattr(TritonServer, "command", lambda self: pytest.fail("nothing may be launched on a taken port"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = TritonServer(empty_repository(tmp_path / "repo"), http_port=port)
        try:
            with pytest.raises(ServerStartError, match=f"HTTP port {port} cannot be used .*--http-port"):
                server.start(timeout=5)
        finally:
            server.stop()
            server.cleanup()
        assert server.proc is None


def test_a_server_that_dies_at_start_is_one_error_line_after_its_log_tail(tmp_path, monkeypatch, capsys):
    from mailroute.cli import main

    # a stand-in for tritonserver that logs the way it does when its port is taken, then exits 1
    log = ("I0101 00:00:00.000000 1 server.cc:1] loading\n"
           "E0101 00:00:01.000000 1 main.cc:42] failed to start GRPC service: Unavailable - Socket '0.0.0.0:8001' already in use\n")
    launch_instead(monkeypatch, [sys.executable, "-c", f"import sys; sys.stdout.write({log!r}); sys.exit(1)"], check_repository=True)
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--repo", str(empty_repository(tmp_path / "repo")), "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
              "--ready-port", "-1", "--timeout", "30"])
    assert exit_.value.code == ("mailroute serve: tritonserver exited with 1 before it was ready: "
                                "failed to start GRPC service: Unavailable - Socket '0.0.0.0:8001' already in use")
    assert "main.cc:42" in capsys.readouterr().err  # the log's last lines come first


def test_a_missing_pytriton_is_named(monkeypatch):
    import importlib.util

    from client.server import ServerStartError, pytriton_dir

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pytriton" else find_spec(name, *a))
    with pytest.raises(ServerStartError, match="nvidia-pytriton is not installed"):
        pytriton_dir()


def test_a_label_index_of_another_bi_encoder_and_a_failed_parity_check_are_one_line_errors():
    from export.onnx_export import ParityError
    from mailroute.cli import _known_failure
    from mailroute.label_index import IndexMismatch

    assert _known_failure(IndexMismatch("label index built from bi-encoder ab12, not cd34: rebuild it with `mailroute export`"))
    assert _known_failure(ParityError("cross_encoder: ONNX differs from PyTorch by 0.3"))
    assert not _known_failure(KeyError("a bug stays a traceback"))


def _help_texts(main, prefix=()):
    """Every (sub)command's --help text, walking the subcommand choices argparse prints."""
    import contextlib
    import io
    import re

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([*prefix, "--help"])
    text = out.getvalue()
    yield " ".join(prefix), text
    usage = text.split("\n\n")[0]
    choices = re.search(r"\{([\w,-]+)\}", usage)
    for name in choices.group(1).split(",") if choices else []:
        yield from _help_texts(main, (*prefix, name))


def test_no_help_text_names_a_machine_path():
    from mailroute.cli import main
    from mailroute.settings import ROOT

    texts = dict(_help_texts(main))
    assert {"train", "demo", "export", "feedback train", "versions promote"} <= set(texts)
    for command, text in texts.items():
        assert str(ROOT) not in "".join(text.split()), f"`mailroute {command} --help` names this checkout's path"
    assert "<checkout>/runs/demo" in texts["demo"] and "<checkout>/model_repository" in texts["export"]
