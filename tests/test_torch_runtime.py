"""The torch runtime on CPU: its encoders agree with the ONNX graphs, its label search equals FAISS, padding
to a CUDA-graph bucket changes nothing, and the real tritonserver serves it. (Its GPU side, fp16 and CUDA
graphs, is measured by benchmarks/gpu/ where a GPU is lent; CI has none.)"""

import importlib.util
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import faiss
import numpy as np
import pytest

from mailroute import contract
from mailroute.pipeline import load_tokenizer, tensors
from mailroute.repository import TOKENIZER_FILE, TORCH_WEIGHTS_DIR, open_classifier, open_onnx_classifier, version_dir
from mailroute.settings import DEFAULTS
from mailroute.torch_encoders import BI, TorchEncoder, TorchEncoders, TorchFlatIP
from training.models import HF_CONFIG_FILE

EMAILS = ["Hi, I was charged twice this month, please refund the extra charge.", "I can't log in, the reset link never arrives.",
          "Where is my order? Tracking has not moved since Monday.", "x"]


@pytest.fixture(scope="module")
def torch_repo(tiny_run, tmp_path_factory):
    from export.run import ExportConfig, export

    repo = tmp_path_factory.mktemp("torch-repo")
    export(ExportConfig(run=str(tiny_run), repo=str(repo), top_k=5, runtime="torch"))
    return repo


def test_torch_flat_ip_equals_faiss():
    rng = np.random.default_rng(0)
    xb, xq = rng.normal(size=(500, 32)).astype(np.float32), rng.normal(size=(7, 32)).astype(np.float32)
    faiss.normalize_L2(xb)
    faiss.normalize_L2(xq)
    index = faiss.IndexFlatIP(32)
    index.add(xb)
    D, I = index.search(xq, 20)
    Dt, It = TorchFlatIP(xb).search(xq, 20)
    assert np.abs(D - Dt).max() < 1e-5 and (I == It).all()
    assert np.allclose(TorchFlatIP(xb).reconstruct_n(3, 2), xb[3:5])


def test_label_scores_by_torch_equal_faiss(tiny_repo):
    clf = open_onnx_classifier(tiny_repo)
    xq = clf.embed(EMAILS)
    a, b = clf.index.label_scores(xq), clf.index.on_device("cpu").label_scores(xq)
    assert np.abs(a - b).max() < 1e-5



def _random_index(counts: tuple, dim: int = 16, depth: int = 1024, top_n: int = 3, seed: int = 0):
    """A label index with `counts[i]` random exemplars for label i (0: description only)."""
    from mailroute.label_index import LabelIndex, LabelScoring
    from mailroute.taxonomy import Label, Taxonomy

    rng = np.random.default_rng(seed)
    taxonomy = Taxonomy(tuple(Label(f"l{i}", f"label {i}") for i in range(len(counts))), "t")
    labels = rng.permutation(np.repeat(np.arange(len(counts)), counts))  # exemplars of a label not contiguous
    ex = rng.normal(size=(len(labels), dim)).astype(np.float32)
    return LabelIndex.build(taxonomy, rng.normal(size=(len(counts), dim)), "enc", ex, labels,
                            scoring=LabelScoring(exemplar_top_n=top_n, description_weight=0.2, search_depth=depth)), rng


def test_exemplar_scores_on_the_device_equal_faiss_where_faiss_sees_every_exemplar(monkeypatch):
    from mailroute.label_index import LabelScoring
    from mailroute.torch_encoders import TorchExemplarIndex

    # a label with none (description only), one with a single exemplar, one with fewer than top_n, uneven others
    index, rng = _random_index((40, 0, 2, 7, 120, 1, 31))
    xq = rng.normal(size=(9, 16)).astype(np.float32)
    faiss.normalize_L2(xq)
    on_device = index.on_device("cpu")
    assert isinstance(on_device.exemplar_index, TorchExemplarIndex)
    assert np.abs(index.label_scores(xq) - on_device.label_scores(xq)).max() < 1e-5
    # leave-one-out: an email's own exemplar does not exist for it, also where that leaves its label with fewer
    # than top_n or none (then the description alone scores it, as for a label that never had exemplars)
    labels = index.exemplar_labels
    exclude = np.array([-1, *(np.flatnonzero(labels == lab)[0] for lab in (0, 2, 3, 4, 5, 6, 5, 2))])
    assert len(exclude) == len(xq)
    left_out = index.label_scores(xq, exclude=exclude)
    assert np.abs(left_out - on_device.label_scores(xq, exclude=exclude)).max() < 1e-5
    desc = index.label_scores(xq, LabelScoring(exemplar_top_n=3, description_weight=1.0))
    assert np.allclose(left_out[[5, 7], 5], desc[[5, 7], 5]) and not np.allclose(left_out[0, 5], desc[0, 5])
    # emails scored in chunks (bounded device memory) give the same scores
    monkeypatch.setattr(TorchExemplarIndex, "CHUNK_ELEMENTS", 1)
    assert np.abs(index.label_scores(xq) - on_device.label_scores(xq)).max() < 1e-5


def test_exemplar_scores_on_the_device_rank_the_candidates_as_faiss_at_a_shallow_depth():
    """FAISS looks at the 64 nearest of 2,000 exemplars; the device scores all of them: the top candidates
    (whose best exemplars lie within those 64) are the same labels with the same scores."""
    index, rng = _random_index((300, 250, 400, 150, 500, 400), dim=8, depth=64)
    xq = index.exemplar_index.reconstruct_n(0, 20) + 0.05 * rng.normal(size=(20, 8)).astype(np.float32)
    faiss.normalize_L2(xq)
    (D, I), (Dt, It) = index.search(xq, 2), index.on_device("cpu").search(xq, 2)
    assert (I == It).all() and np.abs(D - Dt).max() < 1e-5

def test_torch_runtime_agrees_with_onnx(torch_repo):
    bi_dir, cross_dir = version_dir(torch_repo, contract.BI_ENCODER), version_dir(torch_repo, contract.CROSS_ENCODER)
    assert (bi_dir / "model.py").read_text().count("TorchEncoder") and (bi_dir / TORCH_WEIGHTS_DIR / HF_CONFIG_FILE).exists()
    cdir = version_dir(torch_repo, contract.CLASSIFIER)
    flat_dir = version_dir(torch_repo, contract.FLAT_ENCODER)
    by_torch = open_classifier(torch_repo, cdir, TorchEncoders(bi_dir / TORCH_WEIGHTS_DIR, cross_dir / TORCH_WEIGHTS_DIR,
                                                               flat_folder=flat_dir / TORCH_WEIGHTS_DIR))
    by_onnx = open_onnx_classifier(torch_repo)
    for t, o in zip(by_torch.classify(EMAILS, gate=False), by_onnx.classify(EMAILS, gate=False), strict=True):
        assert t.top_labels == o.top_labels
        assert np.abs(np.array(t.top_probabilities) - np.array(o.top_probabilities)).max() < 1e-4
    # the same encoders without the flat classifier refuse its pass by the error every runtime raises
    from mailroute.pipeline import NoFlatClassifier

    two_stages = TorchEncoders(bi_dir / TORCH_WEIGHTS_DIR, cross_dir / TORCH_WEIGHTS_DIR)
    ids, mask = np.ones((1, 4), np.int64), np.ones((1, 4), np.int64)
    with pytest.raises(NoFlatClassifier, match=contract.FLAT_ENCODER):
        two_stages.flat_embed(ids, mask)


def test_padding_to_a_bucket_changes_nothing(torch_repo):
    import torch

    bi_dir = version_dir(torch_repo, contract.BI_ENCODER)
    enc = TorchEncoder(bi_dir / TORCH_WEIGHTS_DIR, BI)
    ids, mask, _ = tensors(load_tokenizer(bi_dir / TOKENIZER_FILE, DEFAULTS.max_email_tokens).encode_batch(EMAILS[:3]))
    plain = enc({contract.INPUT_IDS: ids, contract.ATTENTION_MASK: mask})
    feed = {contract.INPUT_IDS: torch.from_numpy(ids), contract.ATTENTION_MASK: torch.from_numpy(mask)}
    padded = enc.pad(feed, 8, 64)  # what the CUDA-graph path copies into a (8, 64) bucket's buffers
    assert padded[contract.INPUT_IDS].shape == (8, 64) and padded[contract.ATTENTION_MASK][3:, 0].eq(1).all()
    out = enc._forward(**padded).numpy()
    assert np.isfinite(out).all() and np.abs(out[:3] - plain).max() < 1e-5


def test_graph_buckets_pad_a_batch_by_at_most_half_and_end_at_each_encoders_limits(torch_repo):
    from mailroute.torch_encoders import BATCH_BUCKETS, CROSS, _bucket

    # from 16 rows up (below, a batch is launch-bound), a batch computes at most 1.5x its rows; beyond the last, eagerly
    assert all(_bucket(n, BATCH_BUCKETS) <= 1.5 * n for n in range(16, BATCH_BUCKETS[-1] + 1))
    assert _bucket(BATCH_BUCKETS[-1] + 1, BATCH_BUCKETS) is None
    # by default an encoder's graphs end at its model's limits (the most rows and tokens any caller sends it): the
    # largest call gets a graph of its own size, and none larger is captured (load time and memory for nothing)
    for name, kind in ((contract.BI_ENCODER, BI), (contract.FLAT_ENCODER, BI), (contract.CROSS_ENCODER, CROSS)):
        folder = version_dir(torch_repo, name) / TORCH_WEIGHTS_DIR
        enc = TorchEncoder(folder, kind)
        rows, tokens = contract.ENCODER_LIMITS[name]
        assert (enc.batches[-1], enc.sequences[-1]) == (rows, tokens), name
        assert sorted(enc.batches) == list(enc.batches) and len(set(enc.batches)) == len(enc.batches)
    # a limit between buckets is a bucket of its own (a caller's full batch of 100 rows is not padded to 128)
    odd = TorchEncoder(version_dir(torch_repo, contract.BI_ENCODER) / TORCH_WEIGHTS_DIR, BI, max_batch=100, max_sequence=140)
    assert odd.batches[-2:] == (96, 100) and odd.sequences[-2:] == (128, 140)


@pytest.mark.slow
def test_tritonserver_serves_the_torch_runtime(torch_repo, tmp_path):
    from client import ClassifierClient
    from client.server import PYTHON_ENV_TMP, TritonServer

    repo = shutil.copytree(torch_repo, tmp_path / "repo")
    env_tmp = Path(PYTHON_ENV_TMP)  # a str prefix: the backend's env folders are <prefix>XXXXXX
    envs = set(env_tmp.parent.glob(env_tmp.name + "*"))
    with TritonServer(repo) as server, ClassifierClient(server.grpc_url) as c:
        served = c.classify(EMAILS, gate=False)
    assert set(env_tmp.parent.glob(env_tmp.name + "*")) <= envs  # the backend's empty env folders went with the server
    local = open_onnx_classifier(repo).classify(EMAILS, gate=False)
    for s, o in zip(served, local, strict=True):
        assert s.ok and s.top_labels == o.top_labels
        assert np.abs(np.array(s.top_probabilities) - np.array(o.top_probabilities)).max() < 1e-4


def test_libpython_dir_holds_this_interpreters_library():
    """The Python backend stub links against libpython: the server's LD_LIBRARY_PATH must name its folder."""
    from client.server import libpython_dir

    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        pytest.skip("this interpreter is linked statically (sysconfig Py_ENABLE_SHARED is 0): it has no libpython to find")
    name = f"libpython{sys.version_info[0]}.{sys.version_info[1]}.so.1.0"
    assert sysconfig.get_config_var("INSTSONAME") == name  # the library libpython_dir looks for is this interpreter's
    # libpython_dir answers its first candidate when no candidate holds the library: that must fail here, not skip
    assert (Path(libpython_dir()) / name).is_file(), f"{name} is in none of libpython_dir's folders"


def test_carried_weights_round_trip_through_fp16(tmp_path):
    """benchmarks/gpu/weights.py: pack (fp16 + xz) then unpack gives fp32 weights within fp16 rounding, every file kept."""
    import torch
    from safetensors.torch import load_file

    from benchmarks.gpu.weights import WEIGHTS, pack, unpack
    from tiny_encoders import make_tiny_base

    src = make_tiny_base(tmp_path / "base")
    pack(src, tmp_path / "base.tar.xz")
    unpack(tmp_path / "base.tar.xz", tmp_path / "back")
    a, b = load_file(str(src / WEIGHTS)), load_file(str(tmp_path / "back" / WEIGHTS))
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].dtype == a[k].dtype
        if a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=2**-10, atol=1e-7)
        else:
            assert torch.equal(a[k], b[k])
    assert {f.name for f in src.iterdir()} <= {f.name for f in (tmp_path / "back").iterdir()}


def test_gpu_benchmark_rate_counts_every_answer_over_the_common_window():
    """benchmarks/gpu/run.py level_row: client processes load one wall-clock window from a common start; a process that
    was ready late is reported, and the rate is every answer over the window from the first start to the last answer
    (each process's own window would overstate it)."""
    from benchmarks.gpu.run import level_row

    stage = {"embed": 1.0, "rerank": 2.0}
    # Given two processes from a common start at t=100: one loads 100..110, the other was ready at 102 and ends at 111
    parts = [([5.0] * 600, 0, (100.0, 110.0), 150, [stage] * 600),
             ([7.0] * 400, 1, (102.0, 111.0), 100, [stage] * 400)]
    row = level_row(64, False, parts, start_at=100.0)
    # Then 1,000 answers over 11 s (not over the longest process's 10 s), the late start and the error counted
    assert row["emails_per_s"] == pytest.approx(1000 / 11)
    assert row["latest_client_start_s"] == 2.0 and row["errors"] == 1 and row["client_processes"] == 2
    assert row["share_reranked"] == 0.25 and row["p50_ms"] == 5.0
    assert row["outside_stages_p50_ms"] == pytest.approx(5.0 - 3.0)


def test_backend_stub_gets_numpy_below_2(tmp_path, monkeypatch):
    """pytriton 0.7.0's stub corrupts every input tensor under numpy >= 2 (each element reads as the first;
    seen on the GPU machine): where numpy >= 2 the server refuses without a numpy < 2 folder for the stub, and
    with one it builds a stub environment that finds that folder first, then this interpreter's packages."""
    import site

    import numpy

    from client.server import ROOT, STUB_SITE_ENV, stub_interpreter

    monkeypatch.delenv("PYTHONPATH", raising=False)
    assert stub_interpreter(tmp_path) == Path(sys.executable).parent  # numpy < 2 here: this interpreter as it is
    monkeypatch.setattr(numpy, "__version__", "2.5.2")
    monkeypatch.delenv(STUB_SITE_ENV, raising=False)
    with pytest.raises(RuntimeError, match="corrupts every input tensor"):
        stub_interpreter(tmp_path)
    with pytest.raises(RuntimeError, match="no numpy package there"):
        stub_interpreter(tmp_path, str(tmp_path / "missing"))
    (tmp_path / "np1" / "numpy").mkdir(parents=True)
    (tmp_path / "np1" / "numpy" / "__init__.py").write_text("")
    bin_dir = stub_interpreter(tmp_path, str(tmp_path / "np1"))
    assert (bin_dir / "python3").exists()
    pth = next((tmp_path / "stub-env" / "lib").glob("python*/site-packages/mailroute_stub.pth")).read_text().splitlines()
    assert pth[0] == str((tmp_path / "np1").resolve()) and site.getsitepackages()[0] in pth and str(ROOT) in pth
    # SciPy / scikit-learn built for numpy 2 would break transformers' imports in the stub: they look absent there
    seen = subprocess.run([str(bin_dir / "python3"), "-c", "import importlib.util as u; print(u.find_spec('scipy'), u.find_spec('sklearn'))"],
                          capture_output=True, text=True, check=True).stdout.split()
    assert importlib.util.find_spec("scipy") is not None and seen == ["None", "None"]


@pytest.mark.slow
def test_encoders_in_the_classifier_serve_the_same_answers_without_bls(tiny_run, torch_repo, tmp_path):
    from client import ClassifierClient
    from client.server import TritonServer, repository_models
    from export import configs, versions
    from export.run import ExportConfig, export
    from mailroute import contract
    from mailroute.settings import BadSetting

    # Given the torch runtime exported with the encoders inside each classifier instance
    repo = tmp_path / "repo"
    export(ExportConfig(run=str(tiny_run), repo=str(repo), top_k=5, runtime="torch", encoders_in_classifier=True))
    cfg = versions.read_model_config(repo, contract.CLASSIFIER)
    assert cfg.parameters[contract.ENCODERS_PARAMETER].string_value == contract.ENCODERS_IN_PROCESS
    assert configs.classifier_model_config(8, 2, 64, 256, encoders_in_process=True, gpu=True).instance_group[0].kind == \
        configs.mc.ModelInstanceGroup.KIND_GPU
    # When the real server serves it: the classifier alone, since nothing calls the encoder models
    assert repository_models(repo) == [contract.CLASSIFIER]
    assert repository_models(torch_repo)[-1] == contract.CLASSIFIER and len(repository_models(torch_repo)) > 1
    with TritonServer(repo) as server, ClassifierClient(server.grpc_url) as c:
        served = c.classify(EMAILS, gate=False)
        log = server.log_file.read_text()
    assert "successfully loaded 'email_classifier'" in log and "successfully loaded 'bi_encoder'" not in log
    # Then the answers equal the BLS export's (same weights, same pipeline), and the classifier says where its encoders run
    local = open_onnx_classifier(torch_repo).classify(EMAILS, gate=False)
    for s, o in zip(served, local, strict=True):
        assert s.ok and s.top_labels == o.top_labels
        assert np.abs(np.array(s.top_probabilities) - np.array(o.top_probabilities)).max() < 1e-4
    assert "encoders in this process on cpu" in log
    # and a later export into the repository may not move the served versions' encoders back behind BLS calls
    config_before = (repo / contract.CLASSIFIER / versions.CONFIG_FILE).read_text()
    with pytest.raises(BadSetting, match=r"run their encoders in its own process .* this export would move them through BLS"):
        export(ExportConfig(run=str(tiny_run), repo=str(repo), top_k=5, runtime="torch"))
    assert (repo / contract.CLASSIFIER / versions.CONFIG_FILE).read_text() == config_before
    with pytest.raises(BadSetting, match=r"run their encoders through BLS calls .* this export would move them in its own process"):
        export(ExportConfig(run=str(tiny_run), repo=str(torch_repo), top_k=5, runtime="torch", encoders_in_classifier=True))
    # and only the torch runtime can: other runtimes have no PyTorch weights to run in the classifier
    with pytest.raises(BadSetting, match="--encoders-in-classifier"):
        export(ExportConfig(run=str(tiny_run), repo=str(tmp_path / "other"), runtime="portable", encoders_in_classifier=True))
