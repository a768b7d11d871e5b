"""Shared fixtures: a tiny random run (real MiniLM tokenizer), its exported repository, a real Triton server.

Tiny models make the tests fast; they are randomly initialised, so tests assert behaviour (shapes,
consistency, agreement, errors), never accuracy. The slow accuracy test trains real MiniLM weights.
"""

import json
import os
import shutil
from dataclasses import asdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mailroute.flat_head import FlatHead  # noqa: E402
from mailroute.label_index import CardSpec, LabelScoring, weights_id  # noqa: E402
from mailroute.repository import WEIGHTS_FILE  # noqa: E402
from mailroute.rerank_policy import RerankPolicy  # noqa: E402
from mailroute.run_layout import RunFolder  # noqa: E402
from tiny_encoders import make_tiny_base, tiny_bi_encoder  # noqa: E402
from training import bi_encoder as bi  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.data import load_demo  # noqa: E402
from training.models import load_cross_encoder  # noqa: E402


@pytest.fixture(scope="session")
def demo():
    return load_demo()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, demo):
    """A run folder like `mailroute train` writes, with tiny random encoders over the demo taxonomy (and a flat classifier
    whose log-probabilities the policy fuses, so every path runs the flat encoder too)."""
    run = RunFolder(tmp_path_factory.mktemp("tiny-run"))
    run.config.write_text(json.dumps(asdict(TrainConfig(dataset="demo", k_eval=5, flat_fusion="always"))) + "\n")  # its fits keep fusing it
    model = tiny_bi_encoder(tmp_path_factory.mktemp("tiny-bi-base"))
    model.save(str(run.bi_encoder))
    # the label index as training builds it: descriptions + training emails as exemplars + label cards
    x = bi.embed(model, [e.text for e in demo.train])
    cards, _ = bi.label_cards(demo.taxonomy, demo.train, x, CardSpec())
    index = bi.build_label_index(model, demo.taxonomy, weights_id(run.bi_encoder / WEIGHTS_FILE), demo.train,
                                 LabelScoring(exemplar_top_n=3, description_weight=0.3), cards=cards, x=x)
    index.save(run.label_index)
    base = make_tiny_base(tmp_path_factory.mktemp("tiny-cross-base"), seed=1)
    load_cross_encoder(base).save(str(run.cross_encoder))
    flat = tiny_bi_encoder(tmp_path_factory.mktemp("tiny-flat-base"), seed=2)
    flat.save(str(run.flat_encoder))
    rng = np.random.default_rng(3)
    dim = flat.get_embedding_dimension()
    FlatHead(rng.normal(size=(len(demo.taxonomy), dim)), rng.normal(size=len(demo.taxonomy)), 5.0, tuple(demo.taxonomy.names),
             weights_id(run.flat_encoder / WEIGHTS_FILE)).save(run.flat_head)
    # exercise the retrieval and flat fusion in every path, and a gate that fires for about half of the demo emails
    D, _ = index.search(bi.embed(model, [e.text for e in demo.test]), 5)
    RerankPolicy(retrieval_weight=20.0, temperature=1.5, gate_margin=float(np.median(D[:, 0] - D[:, 1])), flat_weight=0.5,
                 gated_flat_weight=0.02).save(run.policy)
    return run.root


@pytest.fixture(scope="session")
def tiny_models(tiny_run):
    from training.models import load_bi_encoder

    run = RunFolder(tiny_run)
    return load_bi_encoder(run.bi_encoder), load_cross_encoder(run.cross_encoder)


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory, tiny_run):
    from export.run import ExportConfig, export

    repo = tmp_path_factory.mktemp("repo")
    export(ExportConfig(run=str(tiny_run), repo=str(repo), top_k=5))
    return repo


@pytest.fixture(scope="session")
def triton(tiny_repo):
    """The real tritonserver binary from nvidia-pytriton, on free ports, over the tiny repository."""
    from client.server import TritonServer

    with TritonServer(tiny_repo, admin_key="test-admin-key") as server:
        yield server


@pytest.fixture()
def tiny_reference(tiny_run):
    from training.reference import load_reference

    return load_reference(tiny_run, top_k=5)


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)


@pytest.fixture()
def repo(tiny_repo, tmp_path):
    """A copy of the tiny model repository that a test may change (tiny_repo itself is shared by the session)."""
    return shutil.copytree(tiny_repo, tmp_path / "repo")
