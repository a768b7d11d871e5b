import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sentence_transformers.base.sampler import NoDuplicatesBatchSampler

from mailroute.label_index import LabelIndex
from mailroute.repository import WEIGHTS_FILE
from mailroute.rerank_policy import RerankPolicy
from mailroute.run_layout import PREDICTIONS_FILE, RunFolder
from training.bi_encoder import LabelDisjointBatchSampler, mnr_dataset, train_bi_encoder
from training.listwise_loss import ListwiseSoftmaxCrossEntropyLoss, listwise_softmax_ce
from training.mining import listwise_rows, mine_candidates


def test_listwise_loss_is_softmax_cross_entropy_of_the_k_logits(tiny_models):
    # Given a cross-encoder and two emails with their candidates
    _, cross = tiny_models
    queries = ["I was charged twice", "my parcel is late"]
    docs = [["refund", "dispute", "double charge"], ["tracking", "delayed", "damaged"]]
    labels = [[0, 0, 1], [0, 1, 0]]
    # When the loss is computed
    loss = ListwiseSoftmaxCrossEntropyLoss(cross)([queries, docs], labels)
    # Then it equals -mean log softmax(logits)[gold], computed by hand from the model's own logits
    with torch.no_grad():
        logits = [cross.model(**cross.preprocess([(q, d) for d in ds])).logits[:, 0] for q, ds in zip(queries, docs)]
    manual = -np.mean([torch.log_softmax(l, 0)[g].item() for l, g in zip(logits, [2, 1])])
    assert loss.item() == pytest.approx(manual, abs=1e-5)


def test_retrieval_score_is_fused_into_the_logits(tiny_models):
    _, cross = tiny_models
    docs, retrieval = ["refund", "dispute", "double charge"], [0.1, 0.5, 0.3]
    policy = RerankPolicy(retrieval_weight=20.0, temperature=2.0)
    loss = ListwiseSoftmaxCrossEntropyLoss(cross, policy=policy)([["charged twice"], [docs], [retrieval]], [[0, 0, 1]])
    with torch.no_grad():
        logits = cross.model(**cross.preprocess([("charged twice", d) for d in docs])).logits[:, 0]
    manual = -torch.log_softmax((logits + 20.0 * torch.tensor(retrieval)) / 2.0, 0)[2].item()  # the policy's formula, by hand
    assert loss.item() == pytest.approx(manual, abs=1e-5)


def test_early_stopping_judges_the_fused_score_a_retrieval_weighted_cross_encoder_is_trained_on(tiny_models, tmp_path):
    # Given validation rows with retrieval scores, and for each the candidate the cross-encoder alone ranks first
    from training.config import TrainConfig
    from training.cross_encoder import KeepBestEpoch, listwise_accuracy

    _, cross = tiny_models
    queries = ["I was charged twice", "my parcel is late", "reset my password"]
    docs = [["refund", "dispute", "double charge"], ["tracking", "delayed", "damaged"], ["login", "password", "locked"]]
    logits = np.asarray(cross.predict([(q, d) for q, ds in zip(queries, docs) for d in ds], convert_to_numpy=True)).reshape(3, 3)
    alone = logits.argmax(1)
    gold = [(int(a) + 1) % 3 for a in alone]  # the cross-encoder alone gets every row wrong
    retrieval = [[1.0 if j == g else 0.0 for j in range(3)] for g in gold]  # retrieval is sure of the gold
    rows = {"query": queries, "docs": docs, "retrieval": retrieval, "labels": [[int(j == g) for j in range(3)] for g in gold]}
    # When accuracy is measured alone, and with a training policy whose retrieval weight is far above the logits' spread
    cfg = TrainConfig(out=str(tmp_path), train_retrieval_weight=10 * float(np.ptp(logits, axis=1).max()) + 1)
    fused = cfg.training_policy()
    assert fused.retrieval_weight == cfg.train_retrieval_weight and fused.ce_weight == 1
    # Then alone it is 0, fused it is 1: early stopping ranks what the loss trained, not the logit alone
    assert listwise_accuracy(cross, rows) == 0.0
    assert listwise_accuracy(cross, rows, fused) == 1.0
    keep_best = KeepBestEpoch(cross, rows, first_epoch=0, policy=fused)
    keep_best.on_epoch_end(None, None, None)
    assert keep_best.history == [1.0]
    # and a policy weighing retrieval over rows without retrieval scores is refused (it would judge the logit alone)
    with pytest.raises(ValueError, match="rows have none"):
        listwise_accuracy(cross, {k: v for k, v in rows.items() if k != "retrieval"}, fused)


def test_listwise_ce_masks_padded_candidates():
    logits = torch.tensor([[2.0, 1.0, 5.0], [0.5, 0.1, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    got = listwise_softmax_ce(logits, torch.tensor([0, 2]), mask)
    want = -(torch.log_softmax(torch.tensor([2.0, 1.0]), 0)[0] + torch.log_softmax(logits[1], 0)[2]) / 2
    assert got.item() == pytest.approx(want.item(), abs=1e-6)


def test_listwise_loss_rejects_rows_without_exactly_one_gold(tiny_models):
    loss = ListwiseSoftmaxCrossEntropyLoss(tiny_models[1])
    with pytest.raises(ValueError, match="exactly one gold"):
        loss([["q"], [["a", "b"]]], [[1, 1]])
    with pytest.raises(ValueError, match="exactly one gold"):
        loss([["q"], [["a", "b"]]], [[0, 0]])


def test_mnr_batches_never_hold_two_rows_of_one_label(tiny_models, demo, monkeypatch):
    """With label-text positives (the default) train_bi_encoder relies on NO_DUPLICATES: every row's positive is its
    label's text, so no duplicate text in a batch means no label twice. Checked on the batches the trainer draws."""
    import copy

    # Given the demo's label-text positives: an email's text names its one label, its positive is that label's text
    ds = mnr_dataset(demo.train, demo.taxonomy)
    label_of = {e.text: e.label for e in demo.train}
    assert len(label_of) == len(demo.train)
    assert list(ds["positive"]) == [demo.taxonomy.labels[demo.taxonomy.index(label_of[a])].text() for a in ds["anchor"]]
    # and a spy on the batches the trainer's sampler yields
    seen = []
    real_iter = NoDuplicatesBatchSampler.__iter__
    monkeypatch.setattr(NoDuplicatesBatchSampler, "__iter__",
                        lambda self: (seen.append([label_of[self.dataset[i]["anchor"]] for i in b]) or b for b in real_iter(self)))
    # When one epoch of MNR runs with the default positives
    train_bi_encoder(copy.deepcopy(tiny_models[0]), demo.train, demo.taxonomy, epochs=1, batch_size=32, lr=1e-4, seed=0)
    # Then it drew every email once, in batches that never hold one label twice
    assert sorted(a for labels in seen for a in labels) == sorted(e.label for e in demo.train)
    assert all(len(set(labels)) == len(labels) for labels in seen)


def test_exemplar_positives_are_another_email_of_the_same_label(demo):
    # Given the demo training emails, one label cut down to a single email
    tax = demo.taxonomy
    lone = demo.train[0].label
    examples = [e for e in demo.train if e.label != lone] + [demo.train[0]]
    label_of = {e.text: e.label for e in examples}
    # When exemplar positives are drawn
    ds = mnr_dataset(examples, tax, "exemplar", seed=3)
    # Then every email is an anchor once, with a different email of its own label as positive ...
    assert sorted(ds["anchor"]) == sorted(e.text for e in examples)
    for a, p, y in zip(ds["anchor"], ds["positive"], ds["label"]):
        assert tax.labels[y].name == label_of[a]
        if label_of[a] == lone:
            assert p == tax.texts[y]  # ... except the label's only email, whose positive is its label text
        else:
            assert p != a and label_of[p] == label_of[a]
    # and every email of a label is some other email's positive once (each label's emails form one cycle)
    assert sorted(p for p, y in zip(ds["positive"], ds["label"]) if tax.labels[y].name != lone) == \
        sorted(e.text for e in examples if e.label != lone)
    # "both" adds the label-text row of every email; a bad name is refused
    assert len(mnr_dataset(examples, tax, "both", seed=3)) == 2 * len(examples) - 1
    with pytest.raises(ValueError, match="description, exemplar, both"):
        mnr_dataset(examples, tax, "emails")


def test_label_disjoint_batches_hold_each_row_once_and_no_label_twice(demo):
    ds = mnr_dataset(demo.train, demo.taxonomy, "both", seed=0)
    sampler = LabelDisjointBatchSampler(ds, batch_size=32, drop_last=False, valid_label_columns=["label"], seed=5)
    batches = list(sampler)
    largest_label = max(np.unique(ds["label"], return_counts=True)[1])
    assert len(batches) == len(sampler) == max(-(-len(ds) // 32), largest_label)
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))  # every row once
    for b in batches:
        assert len({ds[i]["label"] for i in b}) == len(b)  # no label twice
    sizes = [len(b) for b in batches]
    assert max(sizes) <= 32 and min(sizes) >= 0.5 * len(ds) / len(batches)  # about even: no tail of tiny batches
    sampler.set_epoch(1)  # a new order each epoch, the same for the same epoch, and as many batches
    assert list(sampler) != batches and list(sampler) == list(sampler) and len(list(sampler)) == len(batches)
    with pytest.raises(ValueError, match="label columns"):
        LabelDisjointBatchSampler(ds.remove_columns("label"), 8, False, valid_label_columns=["label"])


def test_bi_encoder_trains_on_exemplar_positives_in_label_disjoint_batches(tiny_models, demo, monkeypatch):
    # Given the tiny bi-encoder and a spy on the batches the trainer draws
    bi, _ = tiny_models
    import copy

    seen = []
    real_iter = LabelDisjointBatchSampler.__iter__
    monkeypatch.setattr(LabelDisjointBatchSampler, "__iter__", lambda self: (seen.append(self.labels[b]) or b for b in real_iter(self)))
    model = copy.deepcopy(bi)
    before = [p.detach().clone() for p in model.parameters()]
    # When a few MNR steps run on email positives
    train_bi_encoder(model, demo.train[:120], demo.taxonomy, epochs=1, batch_size=16, lr=1e-3, seed=0, positives="exemplar")
    # Then the trainer drew label-disjoint batches, and the weights moved
    assert seen and all(len(set(labels.tolist())) == len(labels) for labels in seen)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))


def test_mining_matches_brute_force_top_k(tiny_models, demo):
    bi, _ = tiny_models
    index = LabelIndex.build(demo.taxonomy, bi.encode(demo.taxonomy.texts, normalize_embeddings=True), "tiny")
    texts = [e.text for e in demo.train[:40]]
    I, S_all = mine_candidates(bi, texts, index, k=7)  # (40, 7), (40, labels)
    xq = bi.encode(texts, normalize_embeddings=True)
    xb = bi.encode(demo.taxonomy.texts, normalize_embeddings=True)
    S = xq @ xb.T  # brute-force oracle
    assert np.abs(S_all - S).max() < 1e-5
    for row, cand in zip(S, I):
        kth = np.sort(row)[-7]
        assert all(row[c] >= kth - 1e-5 for c in cand)  # tolerant of ties
        assert list(cand) == sorted(cand, key=lambda c: -row[c]) or np.allclose(sorted(row[cand])[::-1], row[cand], atol=1e-5)


def test_listwise_rows_insert_missed_gold_and_shuffle(demo):
    tax = demo.taxonomy
    index = LabelIndex.build(tax, np.eye(len(tax), 64, dtype=np.float32), "x")
    examples = demo.train[:50]
    wrong = np.array([[c for c in range(6) if c != tax.index(e.label)][:5] for e in examples])  # gold never retrieved
    scores = np.random.default_rng(0).random((len(examples), len(tax)))
    rows = listwise_rows(examples, wrong, index, seed=0, scores=scores)
    assert list(rows) == ["query", "docs", "retrieval", "labels"]  # the trainer passes columns in this order
    golds_at = []
    for n, (e, docs, retrieval, labels) in enumerate(zip(examples, rows["docs"], rows["retrieval"], rows["labels"])):
        assert sum(labels) == 1 and len(docs) == 5
        assert docs[labels.index(1)] == tax.labels[tax.index(e.label)].text()
        assert retrieval[labels.index(1)] == scores[n, tax.index(e.label)]  # each retrieval score travels with its candidate
        golds_at.append(labels.index(1))
    assert len(set(golds_at)) > 1  # the gold does not always sit in one position


def test_fusion_fit_recovers_known_weights_and_temperature():
    from training.evaluate import expected_calibration_error
    from mailroute.rerank_policy import fit_fusion

    # Given candidates whose gold is drawn from softmax((logit + 3 x retrieval) / 2.5)
    rng = np.random.default_rng(0)
    logits, retrieval = rng.normal(0, 4, (3000, 5)), rng.normal(0, 1, (3000, 5))
    z = (logits + 3.0 * retrieval) / 2.5
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    gold = np.array([rng.choice(5, p=row) for row in p])
    # When the fusion is fitted by NLL
    policy = fit_fusion(logits, retrieval, gold)
    # Then weight and temperature are close to the true ones, and the probabilities are calibrated
    assert 2.2 < policy.temperature < 2.8 and 2.5 < policy.retrieval_weight < 3.5
    probs = policy.probabilities(logits, retrieval)
    assert expected_calibration_error(probs.max(1), probs.argmax(1) == gold) < 0.04


def test_ece_and_recall_against_hand_computed_values():
    from training.evaluate import expected_calibration_error, macro_f1, recall_at

    # two bins: {0.9, 0.9} with 1 of 2 right -> |0.5-0.9|; {0.3} right -> |1-0.3|; weights 2/3 and 1/3
    assert expected_calibration_error([0.9, 0.9, 0.3], [True, False, True]) == pytest.approx(2 / 3 * 0.4 + 1 / 3 * 0.7)
    assert recall_at([1, 2], np.array([[1, 0, 3], [0, 3, 2]]), ks=(1, 3)) == {"recall@1": 0.5, "recall@3": 1.0}
    assert macro_f1(["a", "a", "b"], ["a", "b", "b"]) == pytest.approx((2 / 3 + 2 / 3) / 2)


def test_macro_f1_averages_over_the_labels_in_gold_or_predictions():
    from training.evaluate import macro_f1, system_metrics

    # Given gold a a b and predictions a c b: a F1 2/3, b F1 1, c (predicted, never gold) F1 0
    gold, pred = ["a", "a", "b"], ["a", "c", "b"]
    # Then macro-F1 averages those three (a taxonomy label neither gold nor predicted would not count:
    # the meaning of every recorded macro-F1)
    assert macro_f1(gold, pred) == pytest.approx((2 / 3 + 1 + 0) / 3)
    m = system_metrics(gold, pred, [0.9, 0.8, 0.7])
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3) and m["accuracy"] == pytest.approx(2 / 3)


# what `mailroute train` writes into metrics.json before the evaluation's own keys (a tiny run's, for resume and baseline)
METRICS_BEFORE_EVALUATION = {
    "dataset": "demo", "labels": 50, "n_train": 450, "n_validation": 50, "n_test": 200, "device": "cpu",
    "cross_encoder_validation_by_epoch": [], "train_time": {}, "anisotropy": {"before": 0.5, "after": 0.3},
    "mining": {"how": "leave-one-out", "gold_retrieved_train": 1.0, "rows": 450}}


def test_resume_trains_only_the_cross_encoder_and_keeps_its_best_epoch(tiny_run, tmp_path):
    import json
    import shutil

    from training.run import resume

    run, more = RunFolder(shutil.copytree(tiny_run, tmp_path / "run")), RunFolder(tmp_path / "more")
    run.metrics.write_text(json.dumps(METRICS_BEFORE_EVALUATION))
    run.predictions.write_text("")
    metrics = resume(run.root, more.root, ce_epochs=1, ce_lr=1e-3, device="cpu")
    history, best = metrics["resume"]["validation_listwise_accuracy_by_epoch"], metrics["resume"]["best_epoch"]
    assert len(history) == 2 and history[best] == max(history)  # the starting weights (epoch 0) and one more epoch compete
    assert (more.bi_encoder / WEIGHTS_FILE).read_bytes() == (run.bi_encoder / WEIGHTS_FILE).read_bytes()
    same_cross = (more.cross_encoder / WEIGHTS_FILE).read_bytes() == (run.cross_encoder / WEIGHTS_FILE).read_bytes()
    assert same_cross == (best == 0)  # the kept weights are the best epoch's
    assert json.loads(more.config.read_text())["ce_epochs"] == 1.0 + best
    assert metrics["resumed_from"] == str(run.root) and "two_stage" in metrics
    # the run's flat classifier comes along and stays fused (the policy fitted again with it, its two-stage fit kept too)
    assert more.has_flat() and (more.flat_head.read_bytes() == run.flat_head.read_bytes())
    assert RerankPolicy.load(more.policy).uses_flat and not RerankPolicy.load(more.policy_without_flat).uses_flat
    with pytest.raises(FileExistsError, match="resume writes a new run folder"):
        resume(run.root, more.root)


@pytest.mark.slow  # two evaluations and two flat trainings: about a minute
def test_baseline_retrains_only_the_flat_softmax_and_keeps_the_old_numbers(tiny_run, tmp_path):
    import json
    import shutil

    from mailroute.settings import BadSetting
    from training.run import refit, retrain_baseline

    out = RunFolder(shutil.copytree(tiny_run, tmp_path / "run"))
    run = out.root
    # tiny weights: a fast flat model; first a run that measures the flat model as the baseline only (not fused)
    cfg = json.loads(out.config.read_text()) | {"base": str(out.bi_encoder), "flat_fusion": "never"}
    out.config.write_text(json.dumps(cfg))
    out.metrics.write_text(json.dumps(METRICS_BEFORE_EVALUATION))
    evaluated = refit(run, device="cpu")
    # When the baseline is trained again with 2 epochs
    metrics = retrain_baseline(run, flat_epochs=2, device="cpu")
    flat = metrics["flat_baseline"]
    assert flat["epochs"] == 2 and len(flat["validation_by_epoch"]) == 2 and flat["n"] == 200
    assert metrics["two_stage"] == evaluated["two_stage"]  # the two-stage system is not touched
    rows = [json.loads(line) for line in out.predictions.read_text().splitlines()]
    assert len(rows) == 200 and all("flat_label" in r for r in rows)
    assert sum(r["flat_label"] == r["gold"] for r in rows) / 200 == pytest.approx(flat["accuracy"])
    assert "flat softmax baseline" in out.report.read_text()
    assert json.loads(out.config.read_text())["flat_epochs"] == 2
    # Again with 1 epoch: the replaced numbers are kept
    metrics = retrain_baseline(run, flat_epochs=1, device="cpu")
    assert [h["epochs"] for h in metrics["flat_baseline_history"]] == [2] and metrics["flat_baseline"]["epochs"] == 1
    with pytest.raises(BadSetting, match="--flat-epochs"):
        retrain_baseline(run, flat_epochs=0)
    # A run that fuses the flat classifier: the new one is kept and the policy fitted again with it
    out.config.write_text(json.dumps(json.loads(out.config.read_text()) | {"flat_fusion": "always"}))
    before = out.flat_head.read_bytes()  # the 1-epoch model's (retrain_baseline keeps the model it trains, fused or not)
    metrics = retrain_baseline(run, flat_epochs=2, device="cpu")
    assert out.flat_head.read_bytes() != before and metrics["refit"]["flat_fused"]
    assert RerankPolicy.load(out.policy).uses_flat and "retrieval_flat" in metrics["variants"]["test"]
    assert [h["epochs"] for h in metrics["flat_baseline_history"]] == [2, 1]
    with pytest.raises(FileNotFoundError, match="not an evaluated run"):
        retrain_baseline(tmp_path / "nothing", flat_epochs=1)


def test_paired_comparison_counts_discordant_emails_and_tests_them():
    from benchmarks.paired import paired_comparison

    gold = ["a"] * 10
    a = ["a"] * 9 + ["b"]  # 9 right
    b = ["a"] * 5 + ["b"] * 5  # 5 right; a alone right on 4 emails, b alone on none
    r = paired_comparison(gold, a, b, resamples=2000)
    assert (r["only_a_right"], r["only_b_right"]) == (4, 0)
    assert r["difference"] == pytest.approx(0.4)
    assert r["mcnemar_exact_p"] == pytest.approx(2 * 0.5 ** 4)  # two-sided binomial, 4 of 4
    assert r["bootstrap_95"][0] <= 0.4 <= r["bootstrap_95"][1]
    assert paired_comparison(gold, a, a)["mcnemar_exact_p"] == 1.0  # no discordant emails: nothing to tell apart
    with pytest.raises(ValueError, match="equally long"):
        paired_comparison(gold, a, b[:3])


def test_paired_against_compares_two_runs_served_labels_on_the_same_emails(tmp_path, capsys):
    from benchmarks.paired import main

    def write(name, labels, gold=("a", "a", "b", "b")):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"gold": g, "label": l}) + "\n" for g, l in zip(gold, labels)))
        return path

    this, other = write("this.jsonl", ["a", "a", "b", "a"]), write("other.jsonl", ["b", "a", "a", "a"])
    main(["--predictions", str(this), "--against", str(other), "--resamples", "200"])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (r["accuracy_a"], r["accuracy_b"], r["only_a_right"], r["only_b_right"]) == (0.75, 0.25, 2, 0)
    assert r["labels_differ"] == 2
    # a run folder is read through its predictions.jsonl; both wrong with different labels counts as a difference
    (tmp_path / "run").mkdir()
    write(f"run/{PREDICTIONS_FILE}", ["b", "a", "b", "c"])
    main(["--predictions", str(this), "--against", str(tmp_path / "run"), "--resamples", "200"])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (r["only_a_right"], r["only_b_right"], r["labels_differ"]) == (1, 0, 2)
    with pytest.raises(SystemExit, match="over the same, non-empty test emails"):
        main(["--predictions", str(this), "--against", str(write("x.jsonl", ["a"] * 4, gold=("a", "b", "b", "b")))])
    with pytest.raises(SystemExit, match="over the same, non-empty test emails"):
        main(["--predictions", str(write("empty.jsonl", [], gold=())), "--against", str(write("empty2.jsonl", [], gold=()))])
    with pytest.raises(SystemExit):  # one comparison at a time
        main(["--predictions", str(this), "--against", str(other), "--flat-from", str(other)])


def test_half_precision_base_weights_load_as_fp32(tmp_path):
    """Weights stored in fp16 (how they are carried to a GPU machine) still train in fp32: the trainer's
    autocast does the low-precision arithmetic, fp16 parameters would wreck AdamW's state."""
    import torch
    from safetensors.torch import load_file, save_file

    from tiny_encoders import make_tiny_base
    from training.models import load_bi_encoder, load_cross_encoder

    base = make_tiny_base(tmp_path / "base")
    w = base / WEIGHTS_FILE
    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(str(w)).items()}, str(w), metadata={"format": "pt"})
    for model in (load_bi_encoder(base), load_cross_encoder(base)):
        assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_drop_autocast_wrapper_restores_the_class_forward(tmp_path):
    """accelerate leaves a trained model's forward wrapped in autocast (an instance attribute); it goes."""
    from tiny_encoders import tiny_bi_encoder
    from training.models import drop_autocast_wrapper

    model = tiny_bi_encoder(tmp_path)
    original = model.forward
    model._original_forward = original
    model.forward = lambda *a, **k: "autocast"
    drop_autocast_wrapper(model)
    assert "forward" not in vars(model) and "_original_forward" not in vars(model)
    assert model.forward.__func__ is type(model).forward


def test_training_refuses_clearly_when_every_training_email_is_on_a_label_card():
    # Given 2 training emails a label, both shown on the fixed label cards (2 examples a label)
    from types import SimpleNamespace

    from mailroute.settings import BadSetting
    from mailroute.taxonomy import CardSpec
    from training.config import TrainConfig
    from training.data import Example
    from training.run import _training_rows

    train = [Example(f"email {i}", "a" if i < 2 else "b") for i in range(4)]
    index = SimpleNamespace(card_spec=CardSpec(examples=2, nearest=False))
    # When the cross-encoder's rows are made, Then the error says why none is left and what to change
    with pytest.raises(BadSetting, match="every one of the 4 training emails is shown on a label card.*--card-examples"):
        _training_rows(TrainConfig(card_examples=2), index, train, np.zeros((4, 3)), np.zeros((4, 2), int), None,
                       {e.text for e in train}, np.full(4, -1))


def test_least_sure_keeps_the_emails_with_the_smallest_retrieval_margin():
    from training.mining import least_sure

    # Given 5 emails' retrieval scores over 4 labels, their candidates best first
    scores = np.array([[.9, .1, .0, .0],    # margin .8: sure
                       [.5, .45, .0, .0],   # .05
                       [.0, .3, .2, .1],    # .1
                       [.4, .4, .1, .0],    # 0: a tie, least sure
                       [.7, .0, .2, .0]])   # .5
    cand = np.argsort(-scores, axis=1, kind="stable")[:, :3]
    # When 40% are kept, Then the 2 smallest margins are, in input order; 50% rounds up to 3
    assert least_sure(cand, scores, 0.4).tolist() == [1, 3]
    assert least_sure(cand, scores, 0.5).tolist() == [1, 2, 3]
    # And share 1, or lists of one candidate (no margin), keep every email
    assert least_sure(cand, scores, 1.0).tolist() == [0, 1, 2, 3, 4]
    assert least_sure(cand[:, :1], scores, 0.4).tolist() == [0, 1, 2, 3, 4]


def test_training_rows_with_a_share_are_the_least_sure_emails_not_on_a_card():
    from training.config import TrainConfig
    from training.data import Example
    from training.run import _training_rows
    from types import SimpleNamespace

    from mailroute.taxonomy import CardSpec, parse_taxonomy

    # Given 6 training emails of 2 labels, email 0 shown on a fixed card; retrieval margins .0 .8 .1 .8 .6 .04
    tax = parse_taxonomy({"name": "t", "labels": [{"name": "a", "description": "A"}, {"name": "b", "description": "B"}]})
    train = [Example(f"email {i}", "a" if i % 2 else "b") for i in range(6)]
    scores = np.array([[.5, .5], [.9, .1], [.45, .55], [.1, .9], [.8, .2], [.52, .48]])
    cand = np.argsort(-scores, axis=1, kind="stable")
    index = SimpleNamespace(card_spec=CardSpec(examples=1, nearest=False), taxonomy=tax, label_texts=["A: card", "B: card"],
                            exemplar_index=None)
    # When the rows are made from the 50% least sure of the 5 emails not on a card
    rows = _training_rows(TrainConfig(card_examples=1, ce_train_share=0.5), index, train, np.zeros((6, 3)), cand, scores,
                          {"email 0"}, np.full(6, -1))
    # Then 3 rows (2.5 rounds up): emails 5, 2 and 4 (margins .04, .1, .6), never the card's email 0 (margin 0)
    assert rows["query"] == ["email 2", "email 4", "email 5"]
    assert all(sum(r) == 1 for r in rows["labels"])


def test_early_stopping_rows_with_a_share_are_the_least_sure_validation_emails():
    from training.config import TrainConfig
    from training.data import Example
    from training.run import _validation_rows
    from types import SimpleNamespace

    from mailroute.taxonomy import CardSpec, parse_taxonomy

    # Given 4 validation emails with retrieval margins .8 .1 .6 .04 (no card filter applies to validation)
    tax = parse_taxonomy({"name": "t", "labels": [{"name": "a", "description": "A"}, {"name": "b", "description": "B"}]})
    val = [Example(f"val {i}", "a" if i % 2 else "b") for i in range(4)]
    scores = np.array([[.9, .1], [.45, .55], [.8, .2], [.52, .48]])
    cand = np.argsort(-scores, axis=1, kind="stable")
    index = SimpleNamespace(card_spec=CardSpec(examples=1, nearest=False), taxonomy=tax, label_texts=["A: card", "B: card"],
                            exemplar_index=None)
    # When the cross-encoder trains on the 50% least sure, its early-stopping rows are the 50% least sure of validation
    rows = _validation_rows(TrainConfig(ce_train_share=0.5), index, val, np.zeros((4, 3)), cand, scores)
    assert rows["query"] == ["val 1", "val 3"]
    # And with the default share every validation email is a row, in order
    assert _validation_rows(TrainConfig(), index, val, np.zeros((4, 3)), cand, scores)["query"] == [e.text for e in val]


@pytest.mark.parametrize("setting, message", [({"bi_positives": "emails"}, "--bi-positives must be one of"),
                                              ({"precision": "int8"}, "--precision must be one of"),
                                              ({"ce_train_share": 0}, r"--ce-train-share must be a share in \(0, 1\]"),
                                              ({"ce_train_share": 50}, "not 50"),
                                              ({"top_n_grid": "1,x"}, r"--top-n-grid must be a comma-separated list .* got '1,x'"),
                                              ({"top_n_grid": ""}, r"--top-n-grid must be .* got ''"),
                                              ({"top_n_grid": " , "}, "--top-n-grid must be"),
                                              ({"top_n_grid": "0,3"}, r"--top-n-grid must be .*integers >= 1"),
                                              ({"description_weight_grid": "0,a"}, "--description-weight-grid must be .* got '0,a'"),
                                              ({"description_weight_grid": "0,1.5"}, r"--description-weight-grid must be .*\[0, 1\]"),
                                              ({"k_eval": 0}, "--k-eval must be an integer >= 1, got 0"),
                                              ({"k_train": 0}, "--k-train must be an integer >= 1, got 0"),
                                              ({"k_train": -2}, "--k-train must be an integer >= 1, got -2"),
                                              ({"ce_batch_size": 0}, "--ce-batch-size must be an integer >= 1"),
                                              ({"bi_batch_size": 0}, "--bi-batch-size must be an integer >= 1"),
                                              ({"flat_batch_size": 0}, "--flat-batch-size must be an integer >= 1"),
                                              ({"flat_epochs": 0}, "--flat-epochs must be >= 1"),
                                              ({"oof_folds": 1}, r"--oof-folds must be 0 .* or >= 2, got 1"),
                                              ({"test_limit": -1}, r"--test-limit must be an integer >= 0 \(0 = no limit\), got -1"),
                                              ({"sample_per_label": -1}, "--sample-per-label must be an integer >= 0"),
                                              ({"max_exemplars_per_label": -1}, "--max-exemplars-per-label must be an integer >= 0"),
                                              ({"ce_init": "flt"}, "--ce-init must be one of base, bi_encoder, flat, got 'flt'"),
                                              ({"flat_lr": -1.0}, "--flat-lr must be a number > 0, got -1.0"),
                                              ({"ce_lr": 0.0}, "--ce-lr must be a number > 0, got 0.0"),
                                              ({"bi_lr": "5e-5"}, "--bi-lr must be a number > 0, got '5e-5'"),
                                              ({"ce_epochs": 0.0}, "--ce-epochs must be a number > 0"),
                                              ({"bi_epochs": -2.0}, "--bi-epochs must be a number > 0")])
def test_bad_training_settings_are_refused_before_any_work(tmp_path, setting, message):
    from mailroute.settings import BadSetting
    from training.config import TrainConfig
    from training.run import run

    with pytest.raises(BadSetting, match=message):
        run(TrainConfig(dataset="demo", out=str(tmp_path / "run"), **setting))
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize("kw, message", [({"ce_epochs": 0}, "--ce-epochs must be a number > 0, got 0"),
                                         ({"ce_lr": 0.0}, "--ce-lr must be a number > 0, got 0.0")])
def test_resume_refuses_zero_epochs_or_learning_rate_instead_of_falling_back(tmp_path, kw, message):
    from mailroute.settings import BadSetting
    from training.run import resume

    with pytest.raises(BadSetting, match=message):  # checked before the run folder is even read
        resume(tmp_path / "no-run", tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_zero_flat_epochs_are_fine_when_the_baseline_is_skipped(tmp_path, monkeypatch):
    import training.run as tr
    from training.config import TrainConfig

    # Given --skip-baseline, --flat-epochs 0 is not refused: the settings checks pass and the run reaches its data
    def reached(cfg):
        raise RuntimeError("reached the data")
    monkeypatch.setattr(tr, "splits_of", reached)
    with pytest.raises(RuntimeError, match="reached the data"):
        tr.run(TrainConfig(dataset="demo", out=str(tmp_path / "run"), flat_epochs=0, skip_baseline=True, device="cpu"))


@pytest.mark.parametrize("parallel", ["0", "-2"])
def test_sweep_refuses_a_parallel_below_one_instead_of_waiting_forever(tmp_path, parallel):
    from training.sweep import main

    # When `mailroute sweep --parallel 0` (no run could ever start), it is refused before any run or folder
    with pytest.raises(SystemExit, match=f"--parallel must be >= 1 .*got {parallel}"):
        main(["--out", str(tmp_path / "sweep"), "--parallel", parallel, "base:"])
    assert not (tmp_path / "sweep").exists()


def test_sweep_threads_sets_each_runs_omp_threads_and_refuses_a_negative(tmp_path, monkeypatch):
    import subprocess
    import training.sweep as sweep

    seen = []

    class Finished:  # a run that has already exited (no training: this checks what the sweep hands each process)
        returncode = 1

        def __init__(self, cmd, env, **kw):
            seen.append((cmd, env))

        def poll(self):
            return 1

    monkeypatch.setattr(subprocess, "Popen", Finished)
    monkeypatch.setattr(sweep.time, "sleep", lambda s: None)
    monkeypatch.setattr(sweep.os, "cpu_count", lambda: 64)  # cores / --parallel would be 8
    # When two sweeps share a machine and one says --threads 3
    assert sweep.main(["--out", str(tmp_path / "s"), "--parallel", "8", "--threads", "3", "a:", "b:--ce-epochs=3"]) == 1
    # Then each of its runs gets 3 OMP/MKL threads, whatever --parallel says
    assert [(env["OMP_NUM_THREADS"], env["MKL_NUM_THREADS"]) for _, env in seen] == [("3", "3"), ("3", "3")]
    assert seen[1][0][-2:] == ["--ce-epochs", "3"]
    # And a negative count is refused by name
    with pytest.raises(SystemExit, match="--threads must be >= 1 .*got -1"):
        sweep.main(["--out", str(tmp_path / "t"), "--threads", "-1", "a:"])


def test_train_and_sweep_refuse_to_write_over_a_trained_run_unless_told(tmp_path, monkeypatch):
    import subprocess

    import training.run as tr
    import training.sweep as sweep
    from mailroute.cli import main as cli

    # Given a folder that holds a finished run (its metrics.json), and a train that only records being called
    done = RunFolder(tmp_path / "sweep" / "a")
    done.root.mkdir(parents=True)
    done.metrics.write_text('{"kept": true}')
    trained = []
    monkeypatch.setattr(tr, "run", lambda cfg: trained.append(cfg.out))
    # When `mailroute train` is pointed at it, it is refused by name and the run stays as it was
    with pytest.raises(SystemExit, match="mailroute train: --out .* already holds a trained run: .* --overwrite"):
        cli(["train", "--dataset", "demo", "--out", str(done.root)])
    assert not trained
    assert done.metrics.read_text() == '{"kept": true}' and not done.config.exists()
    # and with --overwrite it trains there
    cli(["train", "--dataset", "demo", "--out", str(done.root), "--overwrite"])
    assert trained == [str(done.root)]
    # A sweep naming that run is refused before anything starts (its log is not replaced either) ...
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, **kw: started.append(cmd) or SimpleNamespace(poll=lambda: 1, returncode=1))
    monkeypatch.setattr(sweep.time, "sleep", lambda s: None)
    with pytest.raises(SystemExit, match="configuration 'a': --out .* already holds a trained run"):
        sweep.main(["--out", str(tmp_path / "sweep"), "b:", "a:"])
    assert not started and not (tmp_path / "sweep" / "a.log").exists()
    # ... unless its flags say --overwrite
    sweep.main(["--out", str(tmp_path / "sweep"), "b:", "a:", "--", "--overwrite"])
    assert [cmd[cmd.index("--out") + 1] for cmd in started] == [str(tmp_path / "sweep" / n) for n in ("b", "a")]


def test_report_mining_line_names_the_mining_k_not_the_evaluation_k():
    from training.report import mining_line

    # Given a run that mined the top 4 for training but reranks the top 10
    m = {"k": 10, "mining": {"how": "leave-one-out", "k_train": 4, "gold_retrieved_train": 0.9}}
    # Then the report says the gold was among the top-4 mined candidates
    assert mining_line(m) == "Mining: leave-one-out; gold among the top-4 candidates of 90.0% of training emails."
    # And a metrics.json from before k_train was recorded keeps the K it always showed
    del m["mining"]["k_train"]
    assert "gold among the top-10 candidates" in mining_line(m)


def test_a_given_bi_encoder_is_used_as_stage_1_without_training(tiny_run, tmp_path):
    """`mailroute train --bi-encoder FOLDER`: stage 1 is those weights (no MNR epochs), the rest of the run as usual."""
    import json

    from mailroute.label_index import LabelIndex, weights_id
    from mailroute.repository import WEIGHTS_FILE
    from mailroute.run_layout import RunFolder
    from training.config import TrainConfig
    from training.run import run

    given = RunFolder(tiny_run).bi_encoder
    tiny = str(given)  # tiny weights as the base too: a fast cross-encoder
    metrics = run(TrainConfig(dataset="demo", out=str(tmp_path / "run"), base=tiny, bi_encoder=tiny, sample_per_label=3, test_limit=20,
                              ce_epochs=1, ce_batch_size=4, skip_baseline=True, device="cpu", precision="fp32"))
    # Then the run's bi-encoder is the given one to the byte, and its label index is pinned to those weights
    out = RunFolder(tmp_path / "run")
    assert (out.bi_encoder / WEIGHTS_FILE).read_bytes() == (given / WEIGHTS_FILE).read_bytes()
    assert LabelIndex.load(out.label_index).manifest["encoder"] == weights_id(given / WEIGHTS_FILE)
    assert json.loads(out.config.read_text())["bi_encoder"] == tiny
    assert "two_stage" in metrics


@pytest.mark.parametrize("setting, message", [({"bi_encoder": "/nonexistent/bi"}, "--bi-encoder /nonexistent/bi: no such folder"),
                                              ({"bi_encoder": "EMPTY"}, "--bi-encoder .*: no saved model there"),
                                              ({"base": "/nonexistent/base"}, "--base /nonexistent/base: no such folder"),
                                              ({"oof_folds": 3}, "use one or the other")])
def test_a_given_bi_encoder_is_refused_where_it_cannot_be_used(tiny_run, tmp_path, setting, message):
    from mailroute.settings import BadSetting
    from training.config import TrainConfig
    from training.run import run

    if setting.get("bi_encoder") == "EMPTY":  # a folder that exists and holds no model
        (tmp_path / "empty").mkdir()
        setting = {"bi_encoder": str(tmp_path / "empty")}
    with pytest.raises(BadSetting, match=message):
        run(TrainConfig(dataset="demo", out=str(tmp_path / "run"), **({"bi_encoder": str(RunFolder(tiny_run).bi_encoder)} | setting)))
    assert not (tmp_path / "run").exists()


def test_paired_takes_the_flat_baseline_from_another_run_only_over_the_same_test_emails(tmp_path, capsys):
    import json

    from benchmarks.paired import main

    def write(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / name)

    gold = ["a", "b", "a", "b"]
    two_stage = write("two.jsonl", [{"gold": g, "label": g} for g in gold])  # a run that skipped its baseline: all right
    flat = write("flat.jsonl", [{"gold": g, "label": g, "flat_label": "a"} for g in gold])  # right on the two "a" emails
    main(["--predictions", two_stage, "--flat-from", flat, "--resamples", "200"])
    r = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (r["accuracy_a"], r["accuracy_b"], r["only_a_right"], r["only_b_right"]) == (1.0, 0.5, 2, 0)
    other = write("other.jsonl", [{"gold": g, "label": g, "flat_label": g} for g in ["b", "a", "a", "b"]])
    with pytest.raises(SystemExit, match="not a run with a flat baseline over the same test emails"):
        main(["--predictions", two_stage, "--flat-from", other])
    with pytest.raises(SystemExit, match="--flat-from takes another run's"):
        main(["--predictions", two_stage])
    with pytest.raises(SystemExit, match="--flat-from .* does not exist"):
        main(["--predictions", two_stage, "--flat-from", str(tmp_path / "missing.jsonl")])
