"""The parts behind two-stage accuracy: the rerank policy, the exemplar-aware label index, gating,
out-of-fold mining and the device flag."""

import json
import warnings

import numpy as np
import pytest

from mailroute.label_index import CardSpec, IndexMismatch, LabelIndex, LabelScoring
from mailroute.rerank_policy import GateTarget, RerankPolicy, fit_gate
from mailroute.taxonomy import Label, Taxonomy

EMAILS = ["I was charged twice for my plan", "Where is my parcel? Tracking is stuck.", "The app crashes when I open settings",
          "Please send the March invoice", "How many vacation days are left?", "refund please", "my password reset link expired"]


def test_policy_json_round_trip_and_unknown_fields(tmp_path):
    p = RerankPolicy(retrieval_weight=3.5, ce_weight=1.0, temperature=0.7, retrieval_temperature=0.03, gate_margin=0.12)
    p.save(tmp_path / "policy.json")
    assert RerankPolicy.load(tmp_path / "policy.json") == p
    assert RerankPolicy.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(ValueError, match="unknown field"):
        RerankPolicy.from_dict({"prior_scale": 20})
    with pytest.raises(ValueError, match="positive temperatures"):
        RerankPolicy(temperature=0)


def test_policy_formula_is_one_softmax_over_the_fused_scores():
    p = RerankPolicy(retrieval_weight=2.0, temperature=0.5)
    logits, retrieval = np.array([1.0, 0.0, -1.0]), np.array([0.2, 0.9, 0.1])
    z = (logits + 2.0 * retrieval) / 0.5
    assert np.allclose(p.probabilities(logits, retrieval), np.exp(z) / np.exp(z).sum())


def _gate_case(n=400):
    """Retrieval right whenever its margin is above the median, a reranker right everywhere."""
    rng = np.random.default_rng(0)
    retrieval = np.sort(rng.uniform(0, 1, (n, 5)), axis=1)[:, ::-1].copy()
    margin = retrieval[:, 0] - retrieval[:, 1]
    gold = np.where(margin > np.median(margin), 0, 1)
    logits = np.zeros((n, 5))
    logits[np.arange(n), gold] = 10.0
    return logits, retrieval, gold


def test_fit_gate_keeps_accuracy_and_skips_where_retrieval_is_sure():
    logits, retrieval, gold = _gate_case()
    # When the gate is fitted to rerank as few emails as it can
    gated, report = fit_gate(RerankPolicy(), logits, retrieval, gold, GateTarget(tolerance=0.0, rerank_budget=0.0))
    # Then about half the emails skip stage 2, at no accuracy cost
    assert report["accuracy_gated"] == report["accuracy_ungated"] == 1.0
    assert 0.45 <= report["share_reranked"] <= 0.55
    assert not gated.skip_rerank(retrieval, gate=False).any()
    assert gated.skip_rerank(retrieval).mean() == pytest.approx(1 - report["share_reranked"])


def test_fit_gate_spends_the_rerank_budget_and_says_when_it_cannot_keep_it():
    logits, retrieval, gold = _gate_case()
    # A budget above what accuracy needs: the gate reranks up to the budget, the least sure emails first
    gated, report = fit_gate(RerankPolicy(), logits, retrieval, gold, GateTarget(tolerance=0.0, rerank_budget=0.8))
    assert report["within_budget"] and 0.78 <= report["share_reranked"] <= 0.8
    assert report["accuracy_gated"] == 1.0
    margin = retrieval[:, 0] - retrieval[:, 1]
    reranked = ~gated.skip_rerank(retrieval)
    assert margin[reranked].max() <= margin[~reranked].min()
    # A budget below what accuracy needs: the fewest reranked that keep accuracy, flagged as over budget
    _, report = fit_gate(RerankPolicy(), logits, retrieval, gold, GateTarget(tolerance=0.0, rerank_budget=0.3))
    assert not report["within_budget"] and 0.45 <= report["share_reranked"] <= 0.55
    # Budget 1: every email reranked, no gate
    gated, report = fit_gate(RerankPolicy(), logits, retrieval, gold, GateTarget(rerank_budget=1.0))
    assert gated.gate_margin is None and report["share_reranked"] == 1.0


def test_gate_target_refuses_out_of_range_settings():
    with pytest.raises(ValueError, match="rerank_budget"):
        GateTarget(rerank_budget=1.5)


def _tiny_taxonomy():
    return Taxonomy((Label("a", "alpha"), Label("b", "beta"), Label("c", "gamma"), Label("z", "zero-shot label")), "t")


def _unit(rng, n, dim=16):
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_label_scores_match_a_brute_force_oracle():
    # Given descriptions, exemplars for three of four labels, and queries (fixed seed)
    rng = np.random.default_rng(1)
    tax = _tiny_taxonomy()
    xb, xe, xq = _unit(rng, 4), _unit(rng, 30), _unit(rng, 9)
    owner = np.repeat([0, 1, 2], 10)
    s = LabelScoring(exemplar_top_n=3, description_weight=0.25)
    index = LabelIndex.build(tax, xb, "enc", xe, owner, [f"e{i}" for i in range(30)], s)
    # When the index scores every label
    got = index.label_scores(xq)
    # Then it equals the formula computed by hand; the label without exemplars gets its description cosine
    desc, ex = xq @ xb.T, xq @ xe.T
    for lab in range(3):
        top = np.sort(ex[:, owner == lab], axis=1)[:, ::-1][:, :3].mean(1)
        assert np.allclose(got[:, lab], 0.25 * desc[:, lab] + 0.75 * top, atol=1e-5)
    assert np.allclose(got[:, 3], desc[:, 3], atol=1e-5)
    # and leaving one exemplar out is the same formula without it
    got_x = index.label_scores(xq[:1], exclude=np.array([0]))
    top0 = np.sort(ex[0, 1:10])[::-1][:3].mean()
    assert got_x[0, 0] == pytest.approx(0.25 * desc[0, 0] + 0.75 * top0, abs=1e-5)
    D, I = index.search(xq, 2)
    assert np.array_equal(I[:, 0], got.argmax(1)) and np.allclose(D[:, 0], got.max(1), atol=1e-6)


def test_exemplar_index_round_trip_and_refuses_a_foreign_bi_encoder(tmp_path):
    rng = np.random.default_rng(2)
    tax = _tiny_taxonomy()
    index = LabelIndex.build(tax, _unit(rng, 4), "encoder-A", _unit(rng, 6), [0, 0, 1, 1, 2, 2], list("uvwxyz"),
                             LabelScoring(2, 0.5), cards=["a card", "b card", "c card", "zero-shot label"], card_spec=CardSpec(3, 300))
    index.save(tmp_path / "ix")
    again = LabelIndex.load(tmp_path / "ix", expect_encoder="encoder-A")
    xq = _unit(rng, 5)
    assert np.allclose(again.label_scores(xq), index.label_scores(xq), atol=1e-6)
    assert again.exemplar_texts == list("uvwxyz") and again.label_texts[0] == "a card" and again.scoring == LabelScoring(2, 0.5)
    assert again.card_spec == CardSpec(3, 300)  # labels added to this version later get cards of this format
    with pytest.raises(IndexMismatch, match="encoder-B"):
        LabelIndex.load(tmp_path / "ix", expect_encoder="encoder-B")


def test_out_of_fold_mining_never_shows_a_fold_its_own_emails(demo, tiny_models):
    from training import bi_encoder as bi
    from training.mining import mine_out_of_fold

    # Given an encoder "trainer" that records what it was trained on
    bi_model, _ = tiny_models
    examples = demo.train[:60]
    seen = []

    def train_fold_encoder(rest):
        seen.append({e.text for e in rest})
        return bi_model

    def build_index(model, rest):
        assert {e.text for e in rest} == seen[-1]  # the index holds the same emails as its encoder saw
        return bi.build_label_index(model, demo.taxonomy, "fold", rest)

    # When candidates are mined out of fold
    I, S, folds = mine_out_of_fold(examples, 3, 5, 0, train_fold_encoder, build_index)
    # Then each fold was mined by an encoder that never saw any of its emails, and every email was mined once
    assert len(seen) == 3 and I.shape == (60, 5) and S.shape == (60, len(demo.taxonomy))
    for f in range(3):
        held = {e.text for e, g in zip(examples, folds) if g == f}
        assert held and not (held & seen[f])
        assert len(seen[f]) + len(held) >= len({e.text for e in examples})


def test_leave_one_out_mining_does_not_find_the_email_itself(demo, tiny_models):
    from training import bi_encoder as bi
    from training.mining import exemplar_rows, mine_candidates

    bi_model, _ = tiny_models
    index = bi.build_label_index(bi_model, demo.taxonomy, "x", demo.train, LabelScoring(exemplar_top_n=1, description_weight=0.0))
    texts = [e.text for e in demo.train[:40]]
    _, S_all = mine_candidates(bi_model, texts, index, 5)
    _, S_loo = mine_candidates(bi_model, texts, index, 5, exclude=exemplar_rows(index, demo.train[:40]))
    gold = [demo.taxonomy.index(e.label) for e in demo.train[:40]]
    # with top-1 exemplar scoring and the email in the index, its gold label scores its self-similarity (1.0)
    assert np.allclose(S_all[np.arange(40), gold], 1.0, atol=1e-4)
    assert (S_loo[np.arange(40), gold] < 1.0 - 1e-4).all()


def test_gate_off_gives_the_same_labels_where_the_gate_does_not_fire(tiny_reference):
    # Given a policy whose gate fires for about half of the emails
    clf = tiny_reference
    xq = clf.embed(EMAILS)
    D, _ = clf.index.search(xq, clf.top_k)
    margin = np.median(D[:, 0] - D[:, 1])
    clf.policy = clf.policy.with_gate(margin)
    # When classified with and without the gate
    gated, ungated = clf.classify(EMAILS), clf.classify(EMAILS, gate=False)
    # Then stage 2 ran exactly where the gate did not fire, and there the answers are identical
    fired = (D[:, 0] - D[:, 1]) > margin
    assert [not p.reranked for p in gated] == list(fired) and all(p.reranked for p in ungated)
    assert 0 < fired.sum() < len(EMAILS)
    assert len(gated) == len(ungated) == len(EMAILS)
    for g, u, f in zip(gated, ungated, fired, strict=True):
        if not f:
            assert g.top_labels == u.top_labels and g.probability == pytest.approx(u.probability, abs=1e-9)
        else:
            assert sum(g.top_probabilities) == pytest.approx(1.0, abs=1e-6)


def test_cuda_flag_falls_back_to_cpu_with_a_clear_message(monkeypatch):
    import torch

    from training.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="no CUDA device.*CPU"):
        assert resolve_device("cuda") == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("tpu")


def test_training_precision_follows_the_hardware_and_the_flag(monkeypatch):
    import torch

    from training.models import autocast_dtype, trainer_precision_args

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert autocast_dtype("cpu") == torch.bfloat16  # a CPU with bf16 units: bf16 autocast
    assert trainer_precision_args("cpu") == {"use_cpu": True, "bf16": True, "fp16": False}
    assert autocast_dtype("cpu", "fp32") is None and trainer_precision_args("cpu", "fp32")["bf16"] is False
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert autocast_dtype("cpu") is None  # without them fp32 (bf16 would be emulated, slower)
    assert autocast_dtype("cpu", "bf16") == torch.bfloat16  # unless asked for
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert autocast_dtype("cuda") == torch.float16 and trainer_precision_args("cuda")["fp16"] is True
    with pytest.raises(ValueError, match="this GPU has no bf16"):
        autocast_dtype("cuda", "bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast_dtype("cpu", "int8")


@pytest.mark.parametrize("precision, dtype", [("bf16", "bfloat16"), ("fp32", "float32")])
def test_training_runs_in_the_precision_asked_for_and_leaves_fp32_weights(tiny_models, demo, precision, dtype):
    import copy

    import torch

    from training.bi_encoder import train_bi_encoder
    from training.flat_baseline import train_flat

    bi = copy.deepcopy(tiny_models[0])
    seen = set()
    linear = next(m for m in bi.modules() if isinstance(m, torch.nn.Linear))
    hook = linear.register_forward_hook(lambda mod, i, o: seen.add(str(o.dtype)))
    train_bi_encoder(bi, demo.train[:64], demo.taxonomy, epochs=1, batch_size=16, lr=1e-4, seed=0, precision=precision)
    flat, _ = train_flat(bi, demo.train[:32], demo.taxonomy, epochs=1, batch_size=16, lr=1e-4, seed=0, precision=precision)
    hook.remove()
    assert seen == {f"torch.{dtype}"}  # every training forward, both trainers
    assert {p.dtype for p in bi.parameters()} == {torch.float32}
    with torch.no_grad():  # and after training, encoding is fp32 again (as serving is)
        seen.clear()
        hook = linear.register_forward_hook(lambda mod, i, o: seen.add(str(o.dtype)))
        bi.encode(["where is my card"])
        hook.remove()
    assert seen == {"torch.float32"}


def test_sweep_configurations_parse_and_bad_ones_are_named():
    from training.sweep import parse_config

    assert parse_config("oof3:--oof-folds=3,--ce-epochs=2") == ("oof3", ["--oof-folds", "3", "--ce-epochs", "2"])
    assert parse_config("base:") == ("base", []) and parse_config("base") == ("base", [])
    with pytest.raises(ValueError, match="not a --flag=value"):
        parse_config("x:oof-folds=3")
    with pytest.raises(ValueError, match="plain NAME"):
        parse_config("a/b:--k-eval=3")


def test_sweep_summary_row_puts_the_flat_baseline_on_validation_beside_test():
    """Choices are made on validation: the summary shows the flat softmax's validation accuracy (its kept,
    best epoch) next to the two-stage system's, and its test accuracy next to theirs."""
    from training.sweep import summary_row

    acc = lambda a, **kw: {"accuracy": a, **kw}  # noqa: E731
    m = {"variants": {"validation": {"bi_encoder": acc(0.9), "two_stage_ungated": acc(0.91), "two_stage": acc(0.905)},
                      "test": {"bi_encoder": acc(0.92), "two_stage_ungated": acc(0.93), "two_stage": acc(0.925, share_reranked=0.2)}},
         "flat_baseline": {"accuracy": 0.915, "validation_by_epoch": [0.88, 0.907, 0.9]}, "train_time": {"a": 60, "b": 120}}
    cells = [c.strip() for c in summary_row("r", m).strip("| \n").split("|")]
    assert cells == ["r", "90.00%", "91.00%", "90.50%", "90.70%", "92.00%", "93.00%", "92.50%", "20.0%", "91.50%", "3.0"]


def test_label_card_shows_its_examples_within_its_budget():
    spec = CardSpec(examples=2, chars=60, example_chars=10)
    card = spec.text("Refund asked for.", ["I want my money back please", "refund now", "a third one"])
    assert card == "Refund asked for. Examples: I want my  | refund now"
    assert CardSpec(examples=0).text("Refund asked for.", ["x"]) == "Refund asked for."
    assert len(CardSpec(examples=3, chars=40).text("d" * 30, ["e" * 100] * 3)) == 40
    with pytest.raises(ValueError, match="character budgets"):
        CardSpec(chars=0)
    from training.config import TrainConfig

    with pytest.raises(ValueError, match="--card-chars"):  # named by its flag, before any training
        TrainConfig(card_chars=0).card_spec()
    for bad in ({"card_examples": 0}, {"descriptions_only": True}):  # nearest cards need examples and exemplars to show
        with pytest.raises(ValueError, match="--card-nearest"):
            TrainConfig(card_nearest=True, **bad).card_spec()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="CardSpec"):  # cards whose format is unknown would be extended in another one
        LabelIndex.build(_tiny_taxonomy(), _unit(rng, 4), "enc", cards=["a", "b", "c", "d"])
