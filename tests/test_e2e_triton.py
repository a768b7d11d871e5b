"""End to end on the real tritonserver binary (nvidia-pytriton), over gRPC, with the tiny exported models."""

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from client import AsyncClassifierClient, ClassifierClient
from client.classifier_client import retryable
from mailroute import contract
from mailroute.repository import open_onnx_classifier
from mailroute.settings import ROOT, shared_dir
from server_metrics import metric_total, metrics_text

pytestmark = pytest.mark.slow

EMAILS = ["Hi, I was charged twice this month, please refund the extra charge.", "I can't log in, the reset link never arrives.",
          "Where is my order? Tracking has not moved since Monday.", "Please send me the invoice for March.",
          "The app crashes every time I open settings.", "How many vacation days do I have left?"]
SAMPLES = ROOT / "training" / "demo" / "samples"


@pytest.fixture()
def client(triton):
    with ClassifierClient(triton.grpc_url, timeout=60) as c:
        yield c


def test_classify_over_grpc_agrees_with_in_process(client, tiny_repo, tiny_reference):
    served = client.classify(EMAILS)
    onnx_local = open_onnx_classifier(tiny_repo).classify(EMAILS)
    torch_local = tiny_reference.classify(EMAILS)
    for s, o, t in zip(served, onnx_local, torch_local, strict=True):
        assert s.ok and s.model_versions == {"email_classifier": "1", "bi_encoder": "1", "cross_encoder": "1", "flat_encoder": "1"}
        assert s.top_labels == o.top_labels == t.top_labels
        assert np.abs(np.array(s.top_probabilities) - np.array(t.top_probabilities)).max() < 1e-4
        assert set(s.stage_ms) == set(contract.STAGES) and s.stage_ms["rerank"] > 0


def test_parameters_and_async_client(triton, client):
    sync = client.classify(EMAILS[:3], top_k=3, threshold=0.0)
    assert all(len(r.top_labels) == 3 and not r.needs_review for r in sync)

    async def go():
        async with AsyncClassifierClient(triton.grpc_url, max_batch=2) as c:  # 2 requests in flight, gathered
            return await c.classify(EMAILS[:3], top_k=3, threshold=0.0)

    assert [r.top_labels for r in asyncio.run(go())] == [r.top_labels for r in sync]


def test_gate_parameter_and_reranked_output(client, demo):
    # Given the tiny version's gate (it fires for about half of the demo emails)
    emails = [e.text for e in demo.test[:40]]
    gated, ungated = client.classify(emails), client.classify(emails, gate=False)
    # Then the response says where stage 2 ran, gate=false reranks every email, and where both reranked they agree
    assert all(r.reranked for r in ungated)
    assert any(not r.reranked for r in gated) and any(r.reranked for r in gated)
    for g, u in zip(gated, ungated, strict=True):
        if g.reranked:
            assert g.top_labels == u.top_labels and g.probability == pytest.approx(u.probability, abs=1e-5)


def raw_infer(triton, inputs, params=None):
    c = grpcclient.InferenceServerClient(triton.grpc_url)
    return c.infer(contract.CLASSIFIER, inputs, parameters=params, client_timeout=60)


def text_input(values, shape=None, dtype="BYTES"):
    arr = np.array(values, dtype=object if dtype == "BYTES" else np.int32)
    inp = grpcclient.InferInput(contract.TEXT, list(shape or arr.shape), dtype)
    inp.set_data_from_numpy(arr.reshape(shape) if shape else arr)
    return inp


@pytest.mark.parametrize("what,inputs,params,expect", [
    ("empty", [[b""]], None, "row:email is empty"),
    ("whitespace", [[b"  \n\t "]], None, "row:email is empty"),
    ("1 MB", [[b"word " * 200_000]], None, "row:"),
    ("invalid UTF-8", [[b"\xff\xfe\xfa \xc3\x28"]], None, "row:email body is not valid UTF-8"),
    ("over the size limit", [[b"a" * 2_000_001]], None, "row:over the 2,000,000 limit"),
    ("unknown parameter", [[b"hello"]], {"topk": 3}, "request:unknown request parameter(s) ['topk']"),
    ("bad top_k", [[b"hello"]], {"top_k": 500}, "request:top_k must be between 1 and 50"),
    ("bad threshold", [[b"hello"]], {"threshold": "x"}, "request:threshold must be a number"),
    ("boolean top_k", [[b"hello"]], {"top_k": True}, "request:top_k must be an integer, got True"),
    ("bad gate", [[b"hello"]], {"gate": 3}, "request:gate must be a boolean"),
])
def test_bad_input_matrix(triton, client, what, inputs, params, expect):
    kind, msg = expect.split(":", 1)
    if kind == "request":
        with pytest.raises(InferenceServerException, match=msg.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
            raw_infer(triton, [text_input(inputs)], params)
    else:
        res = raw_infer(triton, [text_input(inputs)], params)
        err = res.as_numpy(contract.ERROR)[0, 0].decode()
        assert msg in err if msg else err == ""
    assert client.classify(EMAILS[:1])[0].ok  # still serving


def test_wrong_dtype_and_shape_are_refused_by_the_server(triton, client):
    with pytest.raises(InferenceServerException, match="data-type is 'INT32'"):
        raw_infer(triton, [text_input([[7]], dtype="INT32")])
    with pytest.raises(InferenceServerException, match="unexpected shape"):
        raw_infer(triton, [text_input([[b"a", b"b"]])])
    assert client.classify(EMAILS[:1])[0].ok


def test_mixed_batch_answers_the_good_rows(client):
    res = client.classify([EMAILS[0], "", b"\xff" * 10, EMAILS[1]])
    assert [r.ok for r in res] == [True, False, False, True]
    alone = client.classify([EMAILS[0], EMAILS[1]])
    assert [res[0].label, res[3].label] == [a.label for a in alone]
    assert res[0].probability == pytest.approx(alone[0].probability, abs=1e-4)


def test_shared_conformance_check(triton):
    script = shared_dir() / "checks" / "classifier_conformance.py"
    if not script.exists():
        pytest.skip(f"{script} not present: the workplace's outside checks live in its shared folder (../shared next to "
                    f"the checkout, or $MAILROUTE_SHARED for a clone elsewhere)")
    r = subprocess.run([sys.executable, str(script), triton.grpc_url], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "all checks hold" in r.stdout


def test_repository_api_needs_the_admin_key(triton):
    c = grpcclient.InferenceServerClient(triton.grpc_url)
    with pytest.raises(InferenceServerException, match="restricted") as e:
        c.load_model(contract.CLASSIFIER)
    assert not retryable(e.value)  # the client must not retry a refusal as if the server were down
    c.load_model(contract.CLASSIFIER, headers={"triton-grpc-protocol-admin-key": "test-admin-key"})
    assert c.is_model_ready(contract.CLASSIFIER)


def test_tritons_own_counter_counts_one_request(triton, client):
    success = "nv_inference_request_success"
    before = metric_total(metrics_text(triton), success, model=contract.CLASSIFIER)
    client.classify(EMAILS[:2])  # one gRPC request of two emails
    deadline, moved = time.monotonic() + 10, 0.0
    while not moved and time.monotonic() < deadline:  # Triton publishes its counters on an interval, not per request
        moved = metric_total(metrics_text(triton), success, model=contract.CLASSIFIER) - before
        time.sleep(0.2)
    assert moved == 1


def test_cli_classify_text_eml_and_jsonl(triton, tmp_path):
    jl = tmp_path / "in.jsonl"
    jl.write_text(json.dumps({"id": "a", "subject": "Invoice", "body": "Please resend the March invoice"}) + "\n")
    r = subprocess.run([sys.executable, "-m", "mailroute.cli", "classify", "--url", triton.grpc_url, "--json", "--top-k", "3",
                        "I was charged twice", str(SAMPLES / "login_html.eml"), str(jl)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(l) for l in r.stdout.splitlines()]
    assert [x["source"] for x in rows] == ["arg 1", str(SAMPLES / "login_html.eml"), f"{jl}:1 (a)"]
    assert all(len(x["top_labels"]) == 3 and x["error"] == "" for x in rows)
    bad = subprocess.run([sys.executable, "-m", "mailroute.cli", "classify", "--url", triton.grpc_url, str(tmp_path / "missing.eml")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "missing.eml: file not found" in bad.stderr


def test_new_version_is_loaded_through_the_repository_api(repo, tiny_run):
    """Platform flow: export v2 next to v1, load it with the admin key, callers see v2; v1 files stay for rollback."""
    from client.server import TritonServer
    from export.run import ExportConfig, export

    with TritonServer(repo, admin_key="k") as server:
        with ClassifierClient(server.grpc_url) as c:
            assert c.classify_one(EMAILS[0]).model_versions["email_classifier"] == "1"
            export(ExportConfig(run=str(tiny_run), repo=str(repo), top_k=5))
            admin = grpcclient.InferenceServerClient(server.grpc_url)
            h = {"triton-grpc-protocol-admin-key": "k"}
            for m in contract.ENCODERS + (contract.CLASSIFIER,):  # the encoders first: the new classifier version calls their v2
                admin.load_model(m, headers=h)
            r = c.classify_one(EMAILS[0])
            assert r.model_versions == {"email_classifier": "2", "bi_encoder": "2", "cross_encoder": "2", "flat_encoder": "2"}
            # encoder versions stay loaded for rollback, and every model's version 1 files stay in the repository
            assert admin.is_model_ready(contract.BI_ENCODER, "1") and admin.is_model_ready(contract.CROSS_ENCODER, "1")
            assert all((repo / m / "1").is_dir() for m in contract.MODELS)


def _stop_serve(proc) -> None:
    """Stops a `mailroute serve` still running as a user would (SIGTERM: it stops its tritonserver, which runs in a
    session of its own and would outlive a SIGKILL of the launcher), then kills it only if that fails."""
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _serve(repo, *flags):
    """`mailroute serve` on free ports as a user starts it, its stdout lines in a queue (read by a thread, so that a
    silent serve fails a deadline instead of hanging)."""
    import queue
    import threading

    proc = subprocess.Popen([sys.executable, "-m", "mailroute.cli", "serve", "--repo", str(repo), "--grpc-port", "0",
                             "--http-port", "0", "--metrics-port", "0", *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = queue.Queue()
    threading.Thread(target=lambda: [out.put(line) for line in iter(proc.stdout.readline, "")] + [out.put("")], daemon=True).start()
    return proc, out


def _lines_until(out, prefix: str, seconds: float = 180) -> list:
    import queue
    import time

    lines, deadline = [], time.time() + seconds
    while time.time() < deadline:
        try:
            line = out.get(timeout=max(0.1, deadline - time.time()))
        except queue.Empty:
            break
        lines.append(line)
        if line.startswith(prefix) or not line:
            break
    assert lines and lines[-1].startswith(prefix), f"no line starting {prefix!r} in {seconds:g} s:\n{''.join(lines)}"
    return lines


def _processes_of(work, pattern: str = "") -> list:
    """Processes whose command line names the launcher's temporary folder: tritonserver (its --backend-directory) and
    its backend stubs (pattern: only those matching it before the folder, e.g. the server binary)."""
    out = subprocess.run(["pgrep", "-f", f"{pattern}.*{work}" if pattern else str(work)], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def _work_dir(lines: list):
    """The launcher's temporary folder, from the `starting tritonserver on REPO (log: WORK/triton.log) ...` line."""
    import re
    from pathlib import Path

    line = next(l for l in lines if l.startswith("starting tritonserver"))
    return Path(re.search(r"\(log: (.*)\) \.\.\.", line).group(1)).parent


def test_a_serve_stopped_while_starting_leaves_no_server_and_an_unwatched_server_death_ends_it(tiny_repo):
    """SIGTERM (docker stop, systemd) during the minutes a start may take stops tritonserver too, though it runs in its
    own session; and without a watchdog (--ready-port -1) a tritonserver that dies ends the launcher with its reason,
    instead of a launcher that waits on forever for a server that is gone."""
    import signal
    import time

    proc, out = _serve(tiny_repo, "--ready-port", "-1")
    try:
        work = _work_dir(_lines_until(out, "starting tritonserver", 30))
        deadline = time.time() + 30
        while not _processes_of(work) and time.time() < deadline:  # launched, not yet ready
            time.sleep(0.05)
        assert _processes_of(work), "tritonserver was never launched"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 130  # interrupted, as Ctrl-C
        assert not _processes_of(work) and not work.exists()  # no orphaned server, no temporary folder left
    finally:  # a failed assertion leaves no serve (and no tritonserver holding ports) behind
        _stop_serve(proc)

    proc, out = _serve(tiny_repo, "--ready-port", "-1")
    try:
        work = _work_dir(_lines_until(out, "Ctrl-C"))
        [server_pid] = _processes_of(work, "bin/tritonserver ")
        os.kill(server_pid, signal.SIGKILL)
        assert proc.wait(60) == 1
        rest = "".join(iter(lambda: out.get(timeout=10), ""))
        assert "mailroute serve: tritonserver exited with -9 while serving (no watchdog: --ready-port -1)" in rest
        assert not work.exists()
    finally:  # a failed assertion leaves no serve (and no tritonserver holding ports) behind
        _stop_serve(proc)


def test_serve_command_prints_endpoints_and_stops_on_sigterm(tiny_repo):
    import signal

    proc, out = _serve(tiny_repo, "--ready-port", "0")
    try:
        lines = _lines_until(out, "Ctrl-C")
        grpc_url = next(l.split()[-1] for l in lines if l.strip().startswith("gRPC"))
        with ClassifierClient(grpc_url) as c:
            assert c.ready() and c.classify_one(EMAILS[0]).ok
        ready_url = next(l.split()[1] for l in lines if l.strip().startswith("ready "))
        with urllib.request.urlopen(ready_url, timeout=5) as r:  # the proven readiness: a canary classification passed
            assert r.status == 200 and json.loads(r.read())["ready"] is True
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        rest = []
        while (line := out.get(timeout=10)) != "":
            rest.append(line)
        assert "stopping tritonserver" in "".join(rest)
        with ClassifierClient(grpc_url, retries=0, timeout=2) as c:
            assert not c.ready()  # the server is gone, not orphaned
    finally:  # a failed assertion leaves no serve (and no tritonserver holding ports) behind
        _stop_serve(proc)
