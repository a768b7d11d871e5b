"""The flat classifier fused into the rerank policy: the formula, its fit, the head's pins, and the classifier
versions that carry it (export, derived versions)."""

import re
import shutil

import numpy as np
import pytest

from mailroute import contract
from mailroute.flat_head import FlatHead
from mailroute.label_index import IndexMismatch
from mailroute.rerank_policy import RerankPolicy, fit_fusion, fit_gate, fit_retrieval_temperature
from mailroute.settings import BrokenFile
from stand_ins import empty_repository

EMAILS = ["I was charged twice for my plan", "Where is my parcel? Tracking is stuck.", "refund please", "x"]


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_policy_formula_adds_the_flat_log_probability_in_both_paths():
    p = RerankPolicy(retrieval_weight=2.0, temperature=0.5, flat_weight=0.3, retrieval_temperature=0.1, gated_flat_weight=0.05)
    logits, retrieval, flat = np.array([1.0, 0.0, -1.0]), np.array([0.2, 0.9, 0.1]), np.log([0.2, 0.1, 0.7])
    assert np.allclose(p.probabilities(logits, retrieval, flat), _softmax((logits + 2.0 * retrieval + 0.3 * flat) / 0.5))
    assert np.allclose(p.probabilities(None, retrieval, flat), _softmax((retrieval + 0.05 * flat) / 0.1))  # stage 2 skipped
    assert p.uses_flat and not p.without_flat().uses_flat
    with pytest.raises(ValueError, match="flat classifier"):  # a policy that fuses it cannot answer without it
        p.probabilities(logits, retrieval)
    two_stage = RerankPolicy(retrieval_weight=2.0, temperature=0.5)
    assert np.allclose(two_stage.probabilities(logits, retrieval, flat), two_stage.probabilities(logits, retrieval))  # weight 0: ignored
    assert RerankPolicy.from_dict(p.to_dict()) == p


def _scores_with_flat(informative: bool, n: int = 300, k: int = 5, seed: int = 0):
    """Validation-like scores whose golds follow logit + retrieval, and a flat score that carries signal of its own
    (informative) or is noise."""
    rng = np.random.default_rng(seed)
    logits, retrieval, extra = rng.normal(size=(n, k)), rng.normal(size=(n, k)), rng.normal(size=(n, k))
    z = logits + 2.0 * retrieval + (1.5 * extra if informative else 0.0)
    gold = np.array([rng.choice(k, p=_softmax(row)) for row in z])
    flat = np.log(_softmax(extra if informative else rng.normal(size=(n, k)) * 3))
    return logits, retrieval, flat, gold


@pytest.mark.parametrize("informative", [True, False])
def test_the_flat_classifier_is_fused_only_where_it_lowers_the_held_out_likelihood(informative):
    from mailroute.rerank_policy import cross_validated_nll, flat_fusion_helps
    from training.evaluate import Scored, fit_policy

    logits, retrieval, flat, gold = _scores_with_flat(informative)
    decision = flat_fusion_helps(logits, retrieval, gold, flat)
    assert decision["fused"] == informative
    assert (decision["cv_nll_with_flat"] < decision["cv_nll_without_flat"]) == informative
    # in-sample the extra score never looks worse, noise included: that is why the choice is held out
    from mailroute.rerank_policy import _nll, conditional_logit

    x = np.stack([logits, retrieval, flat], -1)
    assert _nll(x @ conditional_logit([logits, retrieval, flat], gold), gold) <= _nll(x[..., :2] @ conditional_logit([logits, retrieval], gold), gold) + 1e-6
    # a flat score that is the same for every candidate carries nothing: never fused, whatever rounding says
    assert not flat_fusion_helps(logits, retrieval, gold, np.zeros_like(flat))["fused"]
    assert cross_validated_nll([logits, retrieval], gold) == pytest.approx(decision["cv_nll_without_flat"] - cross_validated_nll([retrieval], gold))
    # fit_policy: auto follows the decision, always / never override it; the decision is reported either way
    n, k = logits.shape
    ids = np.tile(np.arange(k), (n, 1))
    sc = Scored(gold=gold, xq=np.zeros((n, 2)), ranked=ids, D=retrieval, I=ids, logits=logits, flat=flat)
    for mode, fused in (("auto", informative), ("always", True), ("never", False)):
        policies = fit_policy(sc, flat_fusion=mode)
        assert policies.fused.uses_flat == fused and policies.flat_fusion["fused"] == fused and policies.flat_fusion["mode"] == mode
        assert policies.flat_fusion["held_out_gain"] == informative  # the rule's verdict, whatever the mode did with it
        assert (policies.two_stage_gated is None) != fused  # the two stages' own gated fit exists where the answer fuses flat


def test_flat_fusion_setting_is_checked_and_old_run_configs_read_as_they_ran(tmp_path):
    import json

    from mailroute.settings import BadSetting
    from training.config import TrainConfig
    from training.run import run

    with pytest.raises(BadSetting, match="--flat-fusion must be one of auto, always, never"):
        run(TrainConfig(dataset="demo", out=str(tmp_path / "run"), flat_fusion="sometimes"))
    # before --flat-fusion, a run config said no_flat_fusion: false meant fused whenever trained, true never
    for old, mode in ((False, "always"), (True, "never")):
        path = tmp_path / f"config_{old}.json"
        path.write_text(json.dumps({"dataset": "demo", "no_flat_fusion": old}))
        assert TrainConfig.load(path).flat_fusion == mode
    assert TrainConfig().flat_fusion == "auto"
    # a config edited by hand is refused when read (refit, resume, baseline, feedback), by name, before any work
    for bad, why in (({"flat_fusion": "yes"}, "flat_fusion must be one of"), ({"flat_fusion": "auto", "no_flat_fusion": True}, "both")):
        path.write_text(json.dumps({"dataset": "demo"} | bad))
        with pytest.raises(BadSetting, match=why):
            TrainConfig.load(path)


def test_fusion_fit_recovers_a_known_flat_weight():
    # Given golds drawn from softmax((logit + 3 x retrieval + 0.8 x flat) / 2)
    rng = np.random.default_rng(0)
    logits, retrieval = rng.normal(0, 4, (4000, 5)), rng.normal(0, 1, (4000, 5))
    flat = np.log(_softmax(rng.normal(0, 2, (4000, 5))))
    p = _softmax((logits + 3.0 * retrieval + 0.8 * flat) / 2.0)
    gold = np.array([rng.choice(5, p=row) for row in p])
    # When fitted by NLL with and without the flat scores
    fused = fit_fusion(logits, retrieval, gold, flat=flat)
    # Then its weights are close to the true ones, and without them the flat weight is 0
    assert 1.7 < fused.temperature < 2.3 and 2.5 < fused.retrieval_weight < 3.5 and 0.6 < fused.flat_weight < 1.0
    assert fit_fusion(logits, retrieval, gold).flat_weight == 0.0
    # and where stage 2 is skipped, the retrieval softmax learns the flat weight beside it (here: golds from retrieval + flat)
    g2 = np.array([rng.choice(5, p=row) for row in _softmax((retrieval + 0.5 * flat) / 0.25)])
    gated = fit_retrieval_temperature(retrieval, g2, RerankPolicy(), flat=flat)
    assert 0.2 < gated.retrieval_temperature < 0.3 and 0.4 < gated.gated_flat_weight < 0.6


def test_gate_reads_the_gated_path_with_the_flat_scores():
    # Retrieval alone is wrong everywhere, retrieval + flat right everywhere, the reranker right everywhere: the gate
    # may then skip stage 2 for every email without losing accuracy, which it could not without the flat scores
    n = 200
    rng = np.random.default_rng(1)
    retrieval = np.sort(rng.uniform(0, 1, (n, 4)), axis=1)[:, ::-1].copy()
    gold = np.ones(n, dtype=int)
    logits, flat = np.zeros((n, 4)), np.full((n, 4), np.log(1e-6))
    logits[:, 1], flat[:, 1] = 10.0, 0.0
    policy = RerankPolicy(gated_flat_weight=1.0, flat_weight=1.0)
    _, with_flat = fit_gate(policy, logits, retrieval, gold, flat=flat)
    _, without = fit_gate(RerankPolicy(), logits, retrieval, gold)
    assert with_flat["accuracy_gated"] == 1.0 and with_flat["share_reranked"] <= 0.25
    assert without["accuracy_gated"] == 1.0 and without["share_reranked"] == 1.0


def test_flat_head_round_trip_and_refusals(tmp_path):
    rng = np.random.default_rng(0)
    head = FlatHead(rng.normal(size=(3, 8)), rng.normal(size=3), 20.0, ("a", "b", "c"), "enc-1")
    head.save(tmp_path / "h.npz")
    back = FlatHead.load(tmp_path / "h.npz")
    x = rng.normal(size=(5, 8))
    assert back.labels == head.labels and back.encoder_id == "enc-1"
    assert np.allclose(back.log_probabilities(x), head.log_probabilities(x), atol=1e-5)
    assert np.allclose(np.exp(head.log_probabilities(x)).sum(1), 1.0)
    with pytest.raises(IndexMismatch, match="labels"):
        back.check(("a", "c", "b"))
    with pytest.raises(IndexMismatch, match="enc-1"):
        back.check(encoder_id="enc-2")
    with pytest.raises(ValueError, match="FlatHead expects"):
        FlatHead(np.zeros((3, 8)), np.zeros(2), 20.0, ("a", "b", "c"), "x")


def test_classifier_refuses_a_flat_policy_without_a_head(tiny_reference):
    from mailroute.pipeline import NoFlatClassifier, TwoStageClassifier

    clf = tiny_reference
    assert clf.policy.uses_flat and clf.flat_head is not None  # the tiny run fuses its flat classifier
    with pytest.raises(NoFlatClassifier, match="no flat head"):
        TwoStageClassifier(clf.encoders, clf.index, clf.bi_tok, clf.cross_tok, policy=clf.policy)
    # the answers move with the flat classifier: without its weight they are the two stages' alone
    with_flat = clf.classify(EMAILS[:3], gate=False)
    clf.policy = clf.policy.without_flat()
    without = clf.classify(EMAILS[:3], gate=False)
    assert any(not np.allclose(a.top_probabilities, b.top_probabilities) for a, b in zip(with_flat, without))
    # the flat pass is timed as a stage of its own, and costs nothing where the policy does not fuse it
    assert set(with_flat[0].stage_ms) == set(contract.STAGES) and with_flat[0].stage_ms["flat"] > 0
    assert without[0].stage_ms["flat"] == 0 and without[0].stage_ms["embed"] > 0


def test_encoders_without_a_flat_classifier_say_so_in_one_typed_error(tiny_repo, tiny_reference):
    from mailroute.onnx_encoders import OnnxEncoders
    from mailroute.pipeline import NoFlatClassifier, TwoStageClassifier
    from mailroute.repository import MODEL_FILE, read_pipeline, version_dir

    clf = tiny_reference
    spec = read_pipeline(version_dir(tiny_repo, contract.CLASSIFIER))
    bi = version_dir(tiny_repo, contract.BI_ENCODER, spec.bi_encoder_version) / MODEL_FILE
    cross = version_dir(tiny_repo, contract.CROSS_ENCODER, spec.cross_encoder_version) / MODEL_FILE
    ids, mask = np.ones((1, 4), np.int64), np.ones((1, 4), np.int64)
    encoders = OnnxEncoders(bi, cross)  # the torch runtime's: test_torch_runtime
    assert encoders.embed(ids, mask).shape == clf.encoders.embed(ids, mask).shape  # the two stages still work
    with pytest.raises(NoFlatClassifier, match=contract.FLAT_ENCODER):
        encoders.flat_embed(ids, mask)
    # a classifier without a flat head refuses to fuse one on request, by the same error (not an AttributeError)
    bare = TwoStageClassifier(clf.encoders, clf.index, clf.bi_tok, clf.cross_tok, policy=clf.policy.without_flat())
    with pytest.raises(NoFlatClassifier, match="in this classifier"):
        bare.encode(["my card payment was declined"], with_flat=True)
    assert bare.encode(["my card payment was declined"])[1] is None


def test_export_pins_the_flat_encoder_and_its_head(tiny_repo, tiny_reference):
    from mailroute.label_index import weights_id
    from mailroute.repository import FLAT_HEAD_FILE, MODEL_FILE, load_flat_head, open_onnx_classifier, read_pipeline, version_dir

    cdir = version_dir(tiny_repo, contract.CLASSIFIER)
    spec = read_pipeline(cdir)
    flat_dir = version_dir(tiny_repo, contract.FLAT_ENCODER, spec.flat_encoder_version)
    assert (cdir / FLAT_HEAD_FILE).exists() and spec.rerank_policy().uses_flat
    assert load_flat_head(tiny_repo, cdir).encoder_id == weights_id(flat_dir / MODEL_FILE)  # pinned to the exported graph
    # the served pipeline (onnxruntime) answers as the run's reference does, flat classifier included
    onnx = open_onnx_classifier(tiny_repo)
    for a, b in zip(onnx.classify(EMAILS, gate=False), tiny_reference.classify(EMAILS, gate=False), strict=True):
        assert a.top_labels == b.top_labels and np.abs(np.array(a.top_probabilities) - np.array(b.top_probabilities)).max() < 1e-4


def test_a_head_pinned_to_another_flat_encoder_is_refused(repo):
    from mailroute.repository import ENCODER_ID_FILE, load_flat_head, version_dir

    flat_dir = version_dir(repo, contract.FLAT_ENCODER)
    (flat_dir / ENCODER_ID_FILE).write_text("another-encoder\n")
    with pytest.raises(IndexMismatch, match="pins flat_encoder"):
        load_flat_head(repo, version_dir(repo, contract.CLASSIFIER))


def test_export_refuses_a_flat_policy_whose_run_kept_no_flat_classifier(tiny_run, tmp_path):
    from export.run import ExportConfig, export
    from mailroute.run_layout import RunFolder

    run = RunFolder(shutil.copytree(tiny_run, tmp_path / "run"))
    run.flat_head.unlink()
    with pytest.raises(FileNotFoundError, match="fuses the flat classifier"):
        export(ExportConfig(run=str(run.root), repo=str(tmp_path / "repo"), top_k=5))
    assert not (tmp_path / "repo" / contract.BI_ENCODER).exists()  # refused before any version was written


def test_derived_versions_keep_the_flat_classifier_unless_a_label_is_new(repo):
    from export.derive import derive_version
    from mailroute.repository import FLAT_HEAD_FILE, open_onnx_classifier, read_pipeline, version_dir
    from mailroute.taxonomy import Label

    base = int(version_dir(repo, contract.CLASSIFIER).name)
    flat_v = read_pipeline(version_dir(repo, contract.CLASSIFIER, base)).flat_encoder_version
    v = derive_version(repo, base, "exemplars", [("my parcel never came", open_onnx_classifier(repo).label_names[0])])
    spec = read_pipeline(version_dir(repo, contract.CLASSIFIER, v))
    assert spec.flat_encoder_version == flat_v and (version_dir(repo, contract.CLASSIFIER, v) / FLAT_HEAD_FILE).exists()
    assert open_onnx_classifier(repo, v).flat_head is not None
    w = derive_version(repo, base, "label", new_labels=[(Label("gift_cards", "Buying or redeeming gift cards"), [])])
    spec = read_pipeline(version_dir(repo, contract.CLASSIFIER, w))
    assert spec.flat_encoder_version is None and not spec.rerank_policy().uses_flat
    assert spec.rerank_policy() == read_pipeline(version_dir(repo, contract.CLASSIFIER, base)).rerank_policy().without_flat()
    # where the export kept the two stages' own fit, a version that drops the flat classifier serves that
    from dataclasses import replace

    from mailroute.repository import write_pipeline

    own = RerankPolicy(retrieval_weight=7.0, temperature=3.0, gate_margin=0.01)
    base_dir = version_dir(repo, contract.CLASSIFIER, base)
    write_pipeline(base_dir, replace(read_pipeline(base_dir), policy_without_flat=own.to_dict()))
    u = derive_version(repo, base, "label", new_labels=[(Label("gift_cards", "Buying or redeeming gift cards"), [])])
    assert read_pipeline(version_dir(repo, contract.CLASSIFIER, u)).rerank_policy() == own
    assert not (version_dir(repo, contract.CLASSIFIER, w) / FLAT_HEAD_FILE).exists()
    clf = open_onnx_classifier(repo, w)  # answers by the two stages alone, over the new taxonomy
    assert clf.flat_head is None and len(clf.classify(EMAILS[:2])) == 2
    # a policy refitted without the flat classifier (a feedback round under --flat-fusion auto) drops it from the version,
    # and with it the base's two-stage fit (fitted for other scores), instead of pinning an encoder nothing runs
    refit = RerankPolicy(retrieval_weight=5.0, temperature=2.0).to_dict()
    x = derive_version(repo, base, "exemplars", [("my parcel never came", open_onnx_classifier(repo).label_names[0])], policy=refit)
    spec = read_pipeline(version_dir(repo, contract.CLASSIFIER, x))
    assert spec.flat_encoder_version is None and spec.policy_without_flat is None and spec.rerank_policy() == RerankPolicy.from_dict(refit)
    assert not (version_dir(repo, contract.CLASSIFIER, x) / FLAT_HEAD_FILE).exists() and open_onnx_classifier(repo, x).flat_head is None


@pytest.mark.parametrize("no_fusion", [False, True])
def test_training_keeps_and_fuses_the_flat_classifier_unless_asked_not_to(tmp_path, no_fusion):
    """`mailroute train` trains the flat classifier before the policy is fitted, keeps it (encoder + head pinned to its
    weights) and fits its weights on validation (--flat-fusion always); never measures it as the baseline only. The reference
    classifier loaded back from the run answers as the evaluation did."""
    import json

    from mailroute.label_index import weights_id
    from mailroute.repository import WEIGHTS_FILE
    from mailroute.run_layout import RunFolder
    from tiny_encoders import make_tiny_base
    from training.config import TrainConfig
    from training.reference import load_reference
    from training.run import run

    base = make_tiny_base(tmp_path / "base")
    m = run(TrainConfig(dataset="demo", out=str(tmp_path / "run"), base=str(base), bi_epochs=0.2, ce_epochs=0.2, flat_epochs=1,
                        test_limit=20, k_train=3, k_eval=3, flat_fusion="never" if no_fusion else "always"))
    out = RunFolder(tmp_path / "run")
    policy = RerankPolicy.load(out.policy)
    assert "flat_baseline" in m and policy.uses_flat != no_fusion and out.has_flat() != no_fusion
    assert ("retrieval_flat" in m["variants"]["test"]) != no_fusion
    # the flat pass is timed apart from the bi-encoder's (the report adds it to the served cost per email)
    assert (m["latency"]["flat_ms_per_email"] > 0) != no_fusion and m["latency"]["embed_ms_per_email"] > 0
    assert bool(re.search(r"embed [\d.]+ ms, flat classifier [\d.]+ ms", out.report.read_text())) != no_fusion
    if not no_fusion:
        head = FlatHead.load(out.flat_head)
        assert head.encoder_id == weights_id(out.flat_encoder / WEIGHTS_FILE) and policy.flat_weight != 0
    clf = load_reference(out.root, top_k=3)
    assert (clf.flat_head is None) == no_fusion
    rows = [json.loads(line) for line in out.predictions.read_text().splitlines()]
    from training.data import splits_of

    test = splits_of(TrainConfig.load(out.config))[3]
    got = clf.classify_texts([e.text for e in test], [""] * len(test))
    assert [p.label for p in got] == [r["label"] for r in rows]  # the run folder serves what was measured


def test_the_launcher_loads_the_encoders_the_repository_has(tmp_path):
    """A repository exported without a flat classifier has no flat_encoder, and a prune may leave its folder without a
    version: the launcher (explicit mode) loads what has a version, read again at every start."""
    from client.server import TritonServer, serving_args

    repo = empty_repository(tmp_path / "repo", version="1")
    (repo / contract.FLAT_ENCODER).mkdir()  # a config, no version (MODELS: the models every repository has)
    server = TritonServer(repo)
    try:
        assert server.models == [contract.BI_ENCODER, contract.CROSS_ENCODER, contract.CLASSIFIER]
        (repo / contract.FLAT_ENCODER / "2").mkdir()  # an export adds one while the launcher exists
        assert server.models == [contract.BI_ENCODER, contract.CROSS_ENCODER, contract.FLAT_ENCODER, contract.CLASSIFIER]
        assert f"--load-model={contract.FLAT_ENCODER}" in serving_args(server.models)
        assert "--load-model=*" in serving_args()  # docker-compose.yml's: whatever the repository holds
    finally:
        shutil.rmtree(server.work, ignore_errors=True)  # the launcher made its scratch folder; nothing was started


def test_a_weightless_reranker_is_never_run():
    """Where validation gives the cross-encoder no weight, stage 2 is skipped for every email (gate or not): its logits
    could not change an answer, so serving does not pay for them, and RERANKED says so."""
    rng = np.random.default_rng(0)
    retrieval = np.sort(rng.uniform(0, 1, (300, 4)), axis=1)[:, ::-1].copy()
    gold = np.array([rng.choice(4, p=row) for row in _softmax(retrieval / 0.2)])
    noise = rng.normal(0, 1, (300, 4)) - 2.0 * (np.arange(4) == gold[:, None])  # logits that point away from gold
    policy = fit_fusion(noise, retrieval, gold)
    assert policy.ce_weight == 0.0
    assert policy.skip_rerank(retrieval, gate=False).all() and policy.skip_rerank(retrieval).all()
    gated, report = fit_gate(policy, noise, retrieval, gold)
    assert report["share_reranked"] == 0.0 and report["reranker_weightless"] and gated.gate_margin is None


def test_bad_flat_inputs_are_named(tmp_path):
    """A hand-edited policy, a damaged head file and a non-numeric pin are refused with what was wrong."""
    from mailroute.repository import PipelineSpec

    with pytest.raises(ValueError, match="flat_weight must be a number"):
        RerankPolicy.from_dict({"flat_weight": "0.5"})
    with pytest.raises(ValueError, match="gated_flat_weight must be a number"):
        RerankPolicy(gated_flat_weight=float("nan"))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(BrokenFile, match="bad.npz is not a flat head"):
        FlatHead.load(tmp_path / "bad.npz")
    np.savez(tmp_path / "partial.npz", weight=np.zeros((2, 3)))
    with pytest.raises(BrokenFile, match="partial.npz is not a flat head"):
        FlatHead.load(tmp_path / "partial.npz")
    with pytest.raises(FileNotFoundError, match="no flat head"):
        FlatHead.load(tmp_path / "absent.npz")
    with pytest.raises(ValueError, match="flat_encoder_version that is not a number"):
        PipelineSpec.from_dict({"bi_encoder_version": 1, "cross_encoder_version": 1, "flat_encoder_version": "two"})
    assert PipelineSpec.from_dict({"bi_encoder_version": 1, "cross_encoder_version": 1}).flat_encoder_version is None  # older file


def test_the_policy_states_its_own_formula_for_the_report():
    fused = RerankPolicy(retrieval_weight=10.5, ce_weight=0.0, temperature=0.0952, flat_weight=0.0428, gated_flat_weight=0.03)
    text = fused.describe()
    assert "(0 x logit + 10.5 x retrieval score + 0.0428 x log p_flat) / 0.0952" in text
    assert "(retrieval score + 0.03 x log p_flat) / 0.05" in text and "p_flat:" in text
    plain = RerankPolicy(retrieval_weight=3.0).describe()
    assert "log p_flat" not in plain and "p_flat:" not in plain and plain.startswith("score = (1 x logit + 3 x retrieval score) / 1")
