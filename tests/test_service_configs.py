"""The classifier's request handling in-process (the same class the Triton model.py adapts), and the
generated Triton configs / compose file validated by the real parsers."""

import shutil
import subprocess

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from mailroute import contract
from mailroute.repository import CONFIG_FILE
from mailroute.service import ClassifierService, Request, RequestError


@pytest.fixture()
def service(tiny_reference):
    return ClassifierService(tiny_reference, ("1", "1", "1"))


def col(*texts):
    return np.array([[t if isinstance(t, bytes) else t.encode()] for t in texts], dtype=object)


def test_batch_of_requests_answers_each_in_order(service):
    out = service.handle([Request(col("refund please", "")), Request(col("parcel late"), parameters='{"top_k": 3}'),
                          Request(col("x"), parameters='{"top_k": 0}')])
    assert out[0][contract.LABEL].shape == (2, 1) and out[0][contract.TOP_LABELS].shape == (2, 5)
    assert out[0][contract.ERROR][1, 0].startswith(b"email is empty")
    assert out[1][contract.TOP_LABELS].shape == (1, 3)
    assert isinstance(out[2], RequestError) and "top_k must be between 1 and 50" in str(out[2])
    assert out[0][contract.MODEL_VERSIONS].shape == (2, len(contract.VERSION_MODELS)) and out[0][contract.STAGE_MS].shape == (2, len(contract.STAGES))
    # three versions given (contract.MODELS, as the model.py of a version exported before the flat encoder passes them): the
    # flat encoder's column says none is pinned
    assert out[0][contract.MODEL_VERSIONS][0].tolist() == ["1", "1", "1", ""]


@pytest.mark.parametrize("req,msg", [
    (Request(col("a"), parameters='{"topk": 3}'), "unknown request parameter(s) ['topk']"),
    (Request(col("a"), parameters='{"threshold": "high"}'), "threshold must be a number"),
    (Request(col("a"), parameters="{not json"), "not JSON"),
    (Request(np.array([b"a", b"b"], dtype=object)), "shape [batch, 1]"),
    (Request(np.array([[1]], dtype=np.int32)), "string tensor"),
    (Request(col("a", "b"), subject=col("s")), "SUBJECT shape [1, 1] differs"),
])
def test_malformed_requests_fail_alone(service, req, msg):
    out = service.handle([req, Request(col("the app crashes"))])
    assert isinstance(out[0], RequestError) and msg in str(out[0])
    assert out[1][contract.ERROR][0, 0] == b""  # the good request in the same batch is answered


def test_subject_is_used(service):
    a = service.handle([Request(col("see subject"), subject=col("Refund for order 12"))])[0]
    b = service.handle([Request(col("Refund for order 12 | see subject"))])[0]
    assert np.allclose(a[contract.TOP_PROBABILITIES], b[contract.TOP_PROBABILITIES], atol=1e-6)


def test_generated_configs_parse_as_model_config(tiny_repo):
    paths = list(tiny_repo.glob("*/config.pbtxt")) + list(tiny_repo.glob("*/configs/*.pbtxt"))
    assert len(paths) == 1 + 2 * len(contract.ENCODERS)  # the classifier's; each encoder's, and its TensorRT config
    for p in paths:
        cfg = text_format.Parse(p.read_text(), model_config_pb2.ModelConfig())
        assert cfg.name == p.parent.name or cfg.name == p.parent.parent.name
        assert cfg.max_batch_size > 0 and cfg.HasField("dynamic_batching")


def test_native_and_portable_encoders_share_the_interface():
    from export.configs import encoder_config

    for name in (contract.BI_ENCODER, contract.CROSS_ENCODER):
        a = text_format.Parse(encoder_config(name, 384, "portable", 64, 1), model_config_pb2.ModelConfig())
        b = text_format.Parse(encoder_config(name, 384, "native", 64, 1, gpu=True), model_config_pb2.ModelConfig())
        assert a.backend == "python" and b.platform == "onnxruntime_onnx"
        assert list(a.input) == list(b.input) and list(a.output) == list(b.output)
        assert b.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    with pytest.raises(ValueError, match="runtime must be one of"):
        encoder_config(contract.BI_ENCODER, 384, "fast", 64, 1)


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed (.ci/run installs it)")
def test_compose_file_is_valid():
    from mailroute.settings import ROOT

    env = {"MAILROUTE_ADMIN_KEY": "k", "PATH": "/usr/bin:/bin"}
    r = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "--model-control-mode=explicit" in r.stdout and "capabilities:\n" in r.stdout.replace("        - gpu\n", "")
    missing = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin"})
    assert missing.returncode != 0 and "MAILROUTE_ADMIN_KEY" in missing.stderr  # no admin key, no stack


@pytest.mark.slow
def test_dockerfile_pins_resolve_for_the_image_python(tmp_path):
    """The production image is Python 3.10: its pip pins must resolve there (binary wheels only)."""
    import re
    import sys

    from mailroute.settings import ROOT

    text = (ROOT / "docker" / "triton.Dockerfile").read_text()
    pins = re.findall(r'"([A-Za-z0-9_.\-]+==[^"]+)"', text)
    assert pins, "no pinned requirements found in docker/triton.Dockerfile"
    probe = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "numpy"], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"no package index reachable from here: {probe.stderr.strip()[-200:]}")
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--python-version", "3.10", "--implementation", "cp",
           "--only-binary=:all:", "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
           "--platform", "manylinux_2_28_x86_64", "--target", str(tmp_path), *pins]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"pins {pins} do not resolve for Python 3.10:\n{res.stderr[-2000:]}"


def test_configs_are_rendered_from_the_contract(tiny_repo):
    from export.configs import RUNTIMES, encoder_config
    from export.runtimes import TENSORRT
    from mailroute.repository import ADAPTER_FILE

    cfg = text_format.Parse((tiny_repo / contract.CLASSIFIER / CONFIG_FILE).read_text(), model_config_pb2.ModelConfig())
    declared = {t.name: t for t in contract.CLASSIFIER_INPUT_TENSORS + contract.CLASSIFIER_OUTPUT_TENSORS}
    for t in list(cfg.input) + list(cfg.output):
        want = declared.pop(t.name)
        assert model_config_pb2.DataType.Name(t.data_type) == want.config_type and tuple(t.dims) == want.dims
    assert not declared  # every declared tensor is in the config
    assert list(cfg.version_policy.specific.versions) == [1]  # the serving version is named
    plan = text_format.Parse(encoder_config(contract.BI_ENCODER, 384, TENSORRT, 64, 1, gpu=True), model_config_pb2.ModelConfig())
    assert plan.platform == "tensorrt_plan" and list(plan.output[0].dims) == [384] and not RUNTIMES[TENSORRT].exported
    assert (tiny_repo / contract.BI_ENCODER / "1" / ADAPTER_FILE).exists() == bool(RUNTIMES["portable"].adapter)


def test_every_runtime_renders_with_throughput_settings():
    from export.configs import RUNTIMES, Throughput, classifier_config, encoder_config, runtime_of

    t = Throughput(instances=4, preferred_batch_sizes=(16, 32, 64, 512), max_queue_delay_us=300, max_queue_size=128)
    for name in RUNTIMES:
        cfg = text_format.Parse(encoder_config(contract.CROSS_ENCODER, 384, name, 256, gpu=True, throughput=t), model_config_pb2.ModelConfig())
        assert runtime_of(cfg) == name and cfg.instance_group[0].count == 4
        assert list(cfg.dynamic_batching.preferred_batch_size) == [16, 32, 64]  # 512 > max_batch_size is dropped
        assert cfg.dynamic_batching.default_queue_policy.max_queue_size == 128
        assert [i.name for i in cfg.input] == list(contract.CROSS_ENCODER_INPUTS)
        assert bool(cfg.model_warmup) == bool(RUNTIMES[name].platform)  # native engines warm up before ready
    native = text_format.Parse(encoder_config(contract.BI_ENCODER, 384, "native", 64, gpu=True), model_config_pb2.ModelConfig())
    acc = native.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert acc.name == "tensorrt" and acc.parameters["trt_engine_cache_enable"] == "1"
    unbounded = text_format.Parse(classifier_config(64, 2, 64, 256, serving_version=1), model_config_pb2.ModelConfig())
    assert not unbounded.dynamic_batching.HasField("default_queue_policy") and unbounded.dynamic_batching.max_queue_delay_microseconds == 2000


def test_an_export_never_changes_the_runtime_of_served_versions(repo, tiny_run):
    from export.run import ExportConfig, export
    from export.runtimes import TENSORRT
    from mailroute.settings import BadSetting

    before = (repo / contract.BI_ENCODER / CONFIG_FILE).read_text()
    with pytest.raises(BadSetting, match="run portable; an export with another runtime would change how they run"):
        export(ExportConfig(run=str(tiny_run), repo=str(repo), runtime="native"))
    assert (repo / contract.BI_ENCODER / CONFIG_FILE).read_text() == before
    assert [p.name for p in (repo / contract.BI_ENCODER).iterdir() if p.name.isdigit()] == ["1"]
    with pytest.raises(BadSetting, match="--runtime must be one of"):
        export(ExportConfig(run=str(tiny_run), repo=str(repo), runtime=TENSORRT))  # plans are built by trtexec, not exported


def test_configs_written_before_the_runtime_parameter_are_recognised():
    from export.configs import runtime_of

    old_portable = 'name: "bi_encoder" backend: "python" max_batch_size: 64 parameters { key: "intra_op_threads" value: { string_value: "0" } }'
    old_native = 'name: "bi_encoder" platform: "onnxruntime_onnx" max_batch_size: 64'
    assert runtime_of(text_format.Parse(old_portable, model_config_pb2.ModelConfig())) == "portable"
    assert runtime_of(text_format.Parse(old_native, model_config_pb2.ModelConfig())) == "native"


def _shape_flags(path) -> dict:
    """trtexec_shapes.txt -> {"min": {input: (batch, tokens)}, "opt": ..., "max": ...}"""
    out = {}
    for line in path.read_text().splitlines():
        kind, _, spec = line.removeprefix("--").partition("Shapes=")
        out[kind] = {name: tuple(int(d) for d in dims.split("x")) for name, dims in (s.split(":") for s in spec.split(","))}
    return out


def _build_tensorrt(repo, tmp_path):
    """docker/build_tensorrt.sh over repo, with a stand-in trtexec that logs its arguments and writes the plan."""
    from mailroute.settings import ROOT

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "trtexec").write_text('#!/usr/bin/env bash\necho "$@" >> "$TRTEXEC_LOG"\n'
                                     'for a in "$@"; do case $a in --saveEngine=*) touch "${a#--saveEngine=}";; esac; done\n')
    (bin_dir / "trtexec").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "TRTEXEC_LOG": str(tmp_path / "trtexec.log")}
    return subprocess.run(["bash", str(ROOT / "docker" / "build_tensorrt.sh"), str(repo)], capture_output=True, text=True, env=env)


def test_native_export_writes_trtexec_shapes_from_the_contract(tiny_run, tmp_path):
    """A native export's encoder versions carry trtexec's shape profiles, rendered from the contract (inputs), the
    config (max_batch_size) and the tokenizer budget; build_tensorrt.sh passes them on, per version, as they are."""
    from export.configs import ENCODER_LIMITS
    from export.run import ExportConfig, export
    from export.versions import read_model_config
    from mailroute.repository import TENSORRT_CONFIG, TRTEXEC_SHAPES_FILE, version_dir

    repo = tmp_path / "repo"
    export(ExportConfig(run=str(tiny_run), repo=str(repo), runtime="native"))
    for name, inputs in ((contract.BI_ENCODER, contract.BI_ENCODER_INPUTS), (contract.CROSS_ENCODER, contract.CROSS_ENCODER_INPUTS),
                         (contract.FLAT_ENCODER, contract.BI_ENCODER_INPUTS)):
        flags = _shape_flags(version_dir(repo, name) / TRTEXEC_SHAPES_FILE)
        max_batch, tokens = ENCODER_LIMITS[name]
        for cfg in (read_model_config(repo, name), text_format.Parse((repo / name / TENSORRT_CONFIG).read_text(), model_config_pb2.ModelConfig())):
            assert cfg.max_batch_size == max_batch and tuple(i.name for i in cfg.input) == inputs
        assert flags == {"min": dict.fromkeys(inputs, (1, 1)), "opt": dict.fromkeys(inputs, (max_batch, tokens)),
                         "max": dict.fromkeys(inputs, (max_batch, tokens))}
    assert not list(repo.glob(f"{contract.CLASSIFIER}/*/{TRTEXEC_SHAPES_FILE}"))

    res = _build_tensorrt(repo, tmp_path)
    assert res.returncode == 0, res.stderr
    calls = (tmp_path / "trtexec.log").read_text().splitlines()
    assert len(calls) == len(contract.ENCODERS) and all(" --fp16 " in c for c in calls)
    for name in contract.ENCODERS:
        vdir = version_dir(repo, name)
        assert f"--onnx={vdir}/model.onnx --saveEngine={vdir}/model.plan --fp16 " + " ".join(
            (vdir / TRTEXEC_SHAPES_FILE).read_text().split()) in calls
    assert _build_tensorrt(repo, tmp_path).returncode == 0 and len((tmp_path / "trtexec.log").read_text().splitlines()) == len(contract.ENCODERS)  # built once


def test_build_tensorrt_stops_at_a_version_without_shapes(tiny_repo, repo, tmp_path):
    """The portable export's fused graphs get no shapes file (TensorRT cannot parse them): the build names the version."""
    from mailroute.repository import TRTEXEC_SHAPES_FILE

    assert not list(tiny_repo.glob(f"*/*/{TRTEXEC_SHAPES_FILE}"))
    res = _build_tensorrt(repo, tmp_path)
    assert res.returncode == 1 and not (tmp_path / "trtexec.log").exists()
    assert f"{contract.BI_ENCODER}/1 has model.onnx but no {TRTEXEC_SHAPES_FILE}" in res.stderr and "--runtime native" in res.stderr


def test_export_help_lists_every_registered_runtime(capsys):
    from export.runtimes import RUNTIMES
    from mailroute.cli import main

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines (and may break at hyphens)
    for name, r in RUNTIMES.items():
        assert "".join(f"{name} = {r.summary}".split()) in text


def test_the_readme_usage_line_names_exactly_the_exported_runtimes():
    import re

    from export.runtimes import EXPORT_RUNTIMES
    from mailroute.settings import ROOT

    usage = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("mailroute export [")]
    assert len(usage) == 1, usage
    assert re.search(r"--runtime ([\w|]+)\]", usage[0]).group(1).split("|") == list(EXPORT_RUNTIMES)


@pytest.mark.parametrize("flags,msg", [({"preferred_batch_sizes": "16,big"}, "--preferred-batch-sizes must be comma-separated"),
                                       ({"max_queue_size": -1}, "--max-queue-size must be at least 0"),
                                       ({"classifier_instances": 0}, "--classifier-instances must be at least 1")])
def test_bad_throughput_flags_are_refused_before_any_work(tiny_run, tmp_path, flags, msg):
    from export.run import ExportConfig, export
    from mailroute.settings import BadSetting

    with pytest.raises(BadSetting, match=msg):
        export(ExportConfig(run=str(tiny_run), repo=str(tmp_path / "repo"), **flags))
    assert not (tmp_path / "repo" / contract.BI_ENCODER).exists()


def test_an_export_to_a_version_one_model_already_has_writes_nothing(repo):
    from export.run import ExportConfig, export
    from mailroute.settings import BadSetting

    shutil.copytree(repo / contract.CLASSIFIER / "1", repo / contract.CLASSIFIER / "2")  # only the classifier has v2
    before = {m: sorted(p.name for p in (repo / m).iterdir()) for m in contract.MODELS}
    with pytest.raises(BadSetting, match=f"--version 2: {contract.CLASSIFIER} in .* already have it"):
        export(ExportConfig(run="no-such-run", repo=str(repo), version=2))  # refused before the run is even read
    assert {m: sorted(p.name for p in (repo / m).iterdir()) for m in contract.MODELS} == before


def test_only_an_unavailable_encoder_is_a_retryable_server_fault():
    from mailroute.service import EncoderUnavailable, server_fault

    message, retryable = server_fault(EncoderUnavailable("bi_encoder v1: model is not ready"))
    assert retryable and message == "classification failed, retry: bi_encoder v1: model is not ready"
    message, retryable = server_fault(KeyError("label_17"))  # a fault of the version itself: the same on a retry
    assert not retryable and message == "classification failed: KeyError: 'label_17'"
    message, _ = server_fault(RuntimeError("index mismatch:\n  expected 77 labels\n  got 76"))
    assert message == "classification failed: RuntimeError: index mismatch: expected 77 labels got 76"  # one line


def test_the_client_retries_a_torn_frame_but_not_a_server_message_over_several_lines():
    from tritonclient.utils import InferenceServerException

    from client.classifier_client import retryable

    assert retryable(InferenceServerException("", status="StatusCode.UNKNOWN"))  # cut off: no message
    assert retryable(InferenceServerException("\x00\x17\x8a", status="StatusCode.INTERNAL"))  # a torn frame's bytes
    assert not retryable(InferenceServerException("classification failed: RuntimeError: a\nb\tc", status="StatusCode.INTERNAL"))


def test_encoder_inputs_are_fed_by_their_declared_names_in_order():
    ids, mask, types = (np.full((1, 2), i) for i in range(3))
    assert list(contract.feed(contract.CROSS_ENCODER, ids, mask, types)) == list(contract.CROSS_ENCODER_INPUTS)
    assert contract.feed(contract.BI_ENCODER, ids, mask)[contract.ATTENTION_MASK] is mask
    with pytest.raises(TypeError, match="bi_encoder takes 2 inputs \\(input_ids, attention_mask\\), got 3"):
        contract.feed(contract.BI_ENCODER, ids, mask, types)


def test_backend_args_read_the_parameters_and_the_instance_device():
    import json

    from mailroute.backend_args import config_parameters, instance_device

    args = {"model_config": json.dumps({"parameters": {contract.EMBED_BATCH_PARAMETER: {"string_value": "32"}}}),
            "model_instance_kind": "GPU", "model_instance_device_id": "1"}
    assert config_parameters(args) == {contract.EMBED_BATCH_PARAMETER: "32"} and instance_device(args) == "cuda:1"
    assert config_parameters({"model_config": "{}"}) == {} and instance_device({"model_instance_kind": "CPU"}) == "cpu"


def test_compose_services_start_tritonserver_with_the_launchers_serving_flags():
    """docker-compose.yml cannot import Python: its tritonserver flags are held equal to client.server.serving_args."""
    import yaml

    from client.server import serving_args
    from mailroute.settings import ROOT

    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    servers = {name: svc["command"] for name, svc in services.items() if svc.get("command", [None])[0] == "tritonserver"}
    assert set(servers) >= {"triton", "triton-trt"}
    expected = serving_args(admin_key="${MAILROUTE_ADMIN_KEY:?set MAILROUTE_ADMIN_KEY}")
    for name, command in servers.items():
        flags = [a for a in command[1:] if not a.startswith(("--model-repository=", "--model-config-name="))]
        assert sorted(flags) == sorted(expected), name  # tritonserver reads its flags in any order
