"""Held-out folds of the training emails (`--holdout-fold`) and choosing a fusion rule on them (benchmarks/oof_choice.py)."""

import json
from collections import Counter

import numpy as np
import pytest

from benchmarks import oof_choice, paired
from mailroute.run_layout import RunFolder
from mailroute.settings import BadSetting
from training.config import TrainConfig
from training.data import load_demo, splits_of, stratified_folds


def test_stratified_folds_deal_every_label_evenly_round_the_folds():
    # Given the demo's training emails (50 labels, ~10 each)
    train = load_demo().train
    # When they are dealt into 3 folds
    fold = stratified_folds(train, 3, seed=7)
    # Then every email has one fold, each label's emails differ by at most one between folds, and the seed fixes the deal
    assert set(fold) == {0, 1, 2}
    for label in {e.label for e in train}:
        counts = Counter(f for e, f in zip(train, fold) if e.label == label)
        assert max(counts.values()) - min(counts.get(f, 0) for f in range(3)) <= 1
    assert stratified_folds(train, 3, seed=7) == fold and stratified_folds(train, 3, seed=8) != fold


def test_holdout_fold_takes_its_emails_out_of_train_and_gives_them_back_as_held_out():
    # Given the two folds of a 2-fold split
    runs = [TrainConfig(dataset="demo", holdout_fold=f"{i}/2") for i in range(2)]
    _, full, val, test = splits_of(TrainConfig(dataset="demo"))
    parts = [(splits_of(c), splits_of(c, held_out=True)) for c in runs]
    for (_, train, v, t), (_, held, v2, t2) in parts:
        # Then a run's train and its held-out fold split the full train; validation and test are untouched
        assert Counter(train + held) == Counter(full) and len(held) >= len(full) // 2 - 25
        assert v == v2 == val and t == t2 == test
    # and the two held-out folds split it too: each training email is held out by exactly one run
    assert Counter(parts[0][1][1] + parts[1][1][1]) == Counter(full)


@pytest.mark.parametrize("bad", ["2/2", "0/1", "-1/3", "a/b", "1"])
def test_a_bad_holdout_fold_is_refused_with_the_setting_named(bad):
    with pytest.raises(BadSetting, match="--holdout-fold"):
        splits_of(TrainConfig(dataset="demo", holdout_fold=bad))
    with pytest.raises(ValueError, match="--holdout-fold"):
        splits_of(TrainConfig(dataset="demo"), held_out=True)


def test_cross_fitting_never_scores_a_fold_with_weights_fitted_on_it():
    # Given two folds whose feature points to the gold candidate in fold 0 and away from it in fold 1
    rng = np.random.default_rng(0)
    folds = []
    for sign in (1.0, -1.0):
        n, k = 200, 5
        gold = rng.integers(0, k, n)
        x = rng.normal(0, 0.1, (n, k))
        x[np.arange(n), gold] += sign
        folds.append({"gold": gold, "I": np.tile(np.arange(k), (n, 1)), "D": x})
    # When the rule "retrieval score only" is cross-fitted
    right, _ = oof_choice.cross_fitted(folds, ["D"], 5)
    # Then each fold is scored by the other fold's weights: wrong almost everywhere (fitted in-sample it would be ~100%)
    assert right.mean() < 0.05


def test_halves_split_each_label_evenly_and_the_same_way_for_the_same_golds():
    gold = np.repeat(np.arange(4), [6, 5, 1, 8])
    scores = {"gold": gold, "D": np.arange(20.0)}
    a, b = oof_choice.halves(scores)
    # every email in exactly one half, each label's emails split as evenly as they can be
    assert sorted(np.concatenate([a["D"], b["D"]])) == list(range(20))
    for label, count in Counter(gold.tolist()).items():
        assert abs((a["gold"] == label).sum() - (b["gold"] == label).sum()) <= count % 2
    # another configuration of the same fold (same golds, other scores) gets the same halves
    a2, _ = oof_choice.halves({"gold": gold, "D": -np.arange(20.0)})
    assert np.array_equal(-a2["D"], a["D"])


def test_mcnemar_and_bootstrap_on_known_counts():
    a = np.array([True] * 10 + [False] * 0 + [True] * 30)
    b = np.array([False] * 10 + [True] * 0 + [True] * 30)
    assert paired.mcnemar_p(a, b) == pytest.approx(2 * 0.5 ** 10)
    assert paired.mcnemar_p(a, a) == 1.0
    lo, hi = paired.bootstrap_interval(a, b)
    assert 0 < lo < 25 < hi


def test_fold_runs_must_be_one_split_of_one_configuration(tmp_path):
    def saved(name, **kw):
        (tmp_path / name).mkdir()
        RunFolder(tmp_path / name).config.write_text(json.dumps(vars(TrainConfig(dataset="demo", out=name, **kw))))
        return str(tmp_path / name)

    a, b = saved("a", holdout_fold="0/2"), saved("b", holdout_fold="1/2")
    assert len(oof_choice._fold_runs([a, b])) == 2
    with pytest.raises(SystemExit, match="folds 0/n"):
        oof_choice._fold_runs([a, saved("c", holdout_fold="0/2")])
    with pytest.raises(SystemExit, match="nothing-here: not a run folder"):
        oof_choice._fold_runs([a, str(tmp_path / "nothing-here")])
    with pytest.raises(SystemExit, match="ce_epochs"):
        oof_choice._fold_runs([a, saved("d", holdout_fold="1/2", ce_epochs=3)])


@pytest.mark.slow
def test_two_held_out_folds_score_every_training_email_once(tmp_path, capsys):
    # Given two tiny demo runs, each trained without one half of the training emails
    from tiny_encoders import make_tiny_base
    from training.run import run

    base = make_tiny_base(tmp_path / "base")  # the bookkeeping below does not need the real MiniLM
    runs = []
    for i in range(2):
        out = tmp_path / f"fold{i}"
        run(TrainConfig(dataset="demo", out=str(out), base=str(base), holdout_fold=f"{i}/2", bi_epochs=0.2, ce_epochs=0.2,
                        skip_baseline=True, test_limit=10, top_n_grid="3", description_weight_grid="0"))
        runs.append(str(out))
    # When the rules are compared on the held-out emails
    assert oof_choice.main(["--runs", *runs, "--json", str(tmp_path / "t.json"), "--device", "cpu"]) == 0
    table = json.loads((tmp_path / "t.json").read_text())
    # Then every training email was scored once, by the run that did not train on it
    assert table["emails"] == len(splits_of(TrainConfig(dataset="demo"))[1])
    retrieved = []  # per held-out email: was its gold among the 5 candidates (else every rule gets it wrong)
    for i, r in enumerate(runs):
        cache = np.load(RunFolder(r).heldout_cache(5))
        _, held, _, _ = splits_of(TrainConfig(dataset="demo", holdout_fold=f"{i}/2"), held_out=True)
        assert len(cache["gold"]) == len(held)
        retrieved.append((cache["I"][:, :5] == cache["gold"][:, None]).any(1))
    rows = {t["rule"]: t for t in table["rules"]}
    assert rows[oof_choice.SERVED]["minus_served_points"] == 0 and rows[oof_choice.SERVED]["mcnemar_p"] == 1.0
    assert {"retrieval only, K=5", "CE + retrieval + probe, K=5"} <= set(rows)
    # and each rule's numbers agree with its own counts against the served rule on those emails
    from scipy.stats import binomtest

    n, served, recall = table["emails"], rows[oof_choice.SERVED]["heldout"], np.concatenate(retrieved).mean()
    for t in table["rules"]:
        assert t["heldout"] <= recall + 1e-12 and round(t["heldout"] * n) == pytest.approx(t["heldout"] * n)
        discordant = t["only_this"] + t["only_served"]
        assert t["heldout"] - served == pytest.approx((t["only_this"] - t["only_served"]) / n)
        assert t["minus_served_points"] == pytest.approx(100 * (t["only_this"] - t["only_served"]) / n)
        assert t["mcnemar_p"] == pytest.approx(1.0 if not discordant else binomtest(t["only_this"], discordant).pvalue)
    assert "held-out training emails in 2 folds" in capsys.readouterr().out


def test_compare_puts_a_second_configuration_beside_the_first_on_the_same_emails(tmp_path, capsys):
    # Given two configurations of 2 fold runs each, with cached held-out scores: the second's cross-encoder points to
    # the gold candidate, the first's is noise (retrieval alone is right 60% of the time in both)
    rng = np.random.default_rng(1)
    n, k = 300, 5
    golds = [rng.integers(0, k, n) for _ in range(2)]

    def fold_run(name, fold, ce_signal, **kw):
        folder = tmp_path / name
        folder.mkdir()
        RunFolder(folder).config.write_text(json.dumps(vars(TrainConfig(dataset="demo", out=name, holdout_fold=f"{fold}/2", **kw))))
        gold = golds[fold]
        D = rng.normal(0, 1, (n, k))
        D[np.arange(n), gold] += np.where(rng.random(n) < 0.6, 5.0, 0.0)
        logits = rng.normal(0, 1, (n, k, 1))
        logits[np.arange(n), gold, 0] += ce_signal
        np.savez(RunFolder(folder).heldout_cache(k), gold=gold, I=np.tile(np.arange(k), (n, 1)), D=D, logits=logits,
                 probe=rng.normal(0, 1, (n, k)), probe_alone_right=np.zeros(n, bool),
                 **{f: rng.normal(0, 1, (n, k)) for f in ("top1", "top3", "top10", "description", "softknn")})
        return str(folder)

    first = [fold_run(f"a{i}", i, 0.0) for i in range(2)]
    second = [fold_run(f"b{i}", i, 6.0, card_nearest=True) for i in range(2)]
    # When the second is compared with the first
    assert oof_choice.main(["--runs", *first, "--compare", *second, "--json", str(tmp_path / "c.json")]) == 0
    rows = {r["rule"]: r for r in json.loads((tmp_path / "c.json").read_text())["compare"]}
    # Then the served rule of the second is far better, on the same emails, and says so with a tiny p
    served = rows[oof_choice.SERVED]
    assert served["second"] > served["first"] + 0.2 and served["mcnemar_p"] < 1e-6 and served["bootstrap95"][0] > 0
    # and retrieval alone (which does not read the cross-encoder) is about equal in both
    assert abs(rows["retrieval only, K=5"]["second_minus_first_points"]) < 8
    assert "against" in capsys.readouterr().out
    # When only fold 1 was scored (its other runs' caches are gone), the comparison runs on its emails alone
    for r in (first[0], second[0]):
        RunFolder(r).heldout_cache(k).unlink()
    assert oof_choice.main(["--runs", *first, "--compare", *second, "--only-fold", "1", "--json", str(tmp_path / "h.json")]) == 0
    half = json.loads((tmp_path / "h.json").read_text())
    # Then every email of that fold is scored once, cross-fitted between two halves, and the verdict is the same
    assert half["emails"] == n and half["folds"] == 2 and half["only_fold"] == 1
    served = {r["rule"]: r for r in half["compare"]}[oof_choice.SERVED]
    assert served["second"] > served["first"] + 0.2 and served["mcnemar_p"] < 1e-6
    assert "fold 1 of 2, as 2 halves" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        oof_choice.main(["--runs", *first, "--only-fold", "2"])
    # A configuration with another fold split (another seed) holds out other emails: refused
    other_seed = [fold_run(f"c{i}", i, 6.0, seed=99) for i in range(2)]
    with pytest.raises(SystemExit, match="other emails"):
        oof_choice.main(["--runs", *first, "--compare", *other_seed])


@pytest.mark.parametrize("argv, message", [
    (["--variants"], "nothing to compare"),
    (["--variants", "--saved", "no-folder"], "is not NAME=FOLDER"),
    (["--variants", "--saved", "d2=/nonexistent/model"], "is not NAME=FOLDER"),
    (["--variants", "labels:2"], "is not POSITIVES:EPOCHS"),
])
def test_bi_positives_refuses_what_it_cannot_compare(argv, message, capsys):
    """The stage-1 study names a bad --variants / --saved before loading any data or model."""
    from benchmarks import bi_positives

    with pytest.raises(SystemExit) as exit_:
        bi_positives.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_heldout_flat_compares_the_served_answers_with_a_flat_baseline_on_every_training_email(tmp_path, capsys, monkeypatch):
    # Given two tiny fold runs whose held-out emails are scored
    from benchmarks import heldout_flat
    from tiny_encoders import make_tiny_base
    from training.reference import load_reference
    from training.run import run

    base = make_tiny_base(tmp_path / "base")
    runs = []
    for i in range(2):
        out = tmp_path / f"fold{i}"
        run(TrainConfig(dataset="demo", out=str(out), base=str(base), holdout_fold=f"{i}/2", bi_epochs=0.2, ce_epochs=0.2,
                        skip_baseline=True, test_limit=10, top_n_grid="3", description_weight_grid="0"))
        runs.append(str(out))
    assert oof_choice.main(["--runs", *runs, "--device", "cpu"]) == 0
    # When the flat baseline is trained on each fold run's training emails and compared on its held-out ones
    args = ["--runs", *runs, "--flat-epochs", "1", "--base", str(base), "--device", "cpu", "--resamples", "200"]
    assert heldout_flat.main([*args, "--json", str(tmp_path / "h.json")]) == 0
    report = json.loads((tmp_path / "h.json").read_text())
    # Then every training email is compared once, and the served answers are what the run's classifier answers
    assert report["emails"] == len(splits_of(TrainConfig(dataset="demo"))[1]) == sum(f["emails"] for f in report["folds"])
    _, held, _, _ = splits_of(TrainConfig(dataset="demo", holdout_fold="0/2"), held_out=True)
    reference = load_reference(runs[0], top_k=5)
    names = reference.label_names
    served = heldout_flat.served_predictions(runs[0])
    answers = reference.classify([e.text for e in held])
    assert [names[i] for i in served["gated"]] == [p.label for p in answers]
    gated = report["gated"]
    assert gated["accuracy_a"] == pytest.approx(np.average([f["two_stage"] for f in report["folds"]], weights=[f["emails"] for f in report["folds"]]))
    # and a second call reads the cached flat answers instead of training again
    monkeypatch.setattr("training.run.train_flat_baseline", lambda *a, **kw: pytest.fail("trained again"))
    assert heldout_flat.main([*args, "--json", str(tmp_path / "h2.json")]) == 0
    assert json.loads((tmp_path / "h2.json").read_text())["gated"] == gated
    assert set(report) >= {"gated", "ungated", "retrieval", "vote", "ensemble", "ensemble_gated", "retrieval_flat",
                           "cross_encoder_in_ensemble"}


def test_the_vote_takes_the_answer_two_of_three_give_and_two_stage_otherwise():
    from benchmarks.heldout_flat import vote

    two_stage, flat, retrieval = np.array([1, 1, 1, 1]), np.array([1, 2, 2, 2]), np.array([5, 2, 1, 3])
    # agree | retrieval sides with flat | retrieval sides with two-stage | sides with neither
    assert vote(two_stage, flat, retrieval).tolist() == [1, 2, 1, 1]


def test_the_conditional_logit_fit_recovers_the_weights_that_generated_the_answers():
    from benchmarks.fusion_study import _fit

    rng = np.random.default_rng(0)
    X = rng.normal(0, 1, (20_000, 5, 3))
    true = np.array([2.0, -1.0, 0.5])
    z = X @ true
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    gold = np.array([rng.choice(5, p=row) for row in p])
    assert _fit(X, gold) == pytest.approx(true, abs=0.1)


def test_fitted_ensembles_answer_each_fold_with_weights_fitted_on_the_other_folds_only():
    from benchmarks.heldout_flat import fitted_ensembles

    rng = np.random.default_rng(1)
    n, k, labels = 400, 5, 8

    def fold():
        gold = rng.integers(0, labels, n)
        I = np.array([rng.permutation(labels)[:k] for _ in range(n)])
        I[:, 0] = np.where(rng.random(n) < 0.9, gold, I[:, 0])  # gold retrieved, mostly first
        I[:, 1:] = np.where(I[:, 1:] == I[:, :1], (I[:, 1:] + 1) % labels, I[:, 1:])
        flat = rng.dirichlet(np.ones(labels), n)
        flat[np.arange(n), gold] += 2.0
        return ({"gold": gold, "I": I, "D": rng.normal(0, 1, (n, k)), "logits": rng.normal(0, 1, (n, k, 1))},
                flat / flat.sum(1, keepdims=True))

    folds = [fold() for _ in range(3)]
    skips = [rng.random(n) < 0.5 for _ in range(3)]
    first, weights = fitted_ensembles([f[0] for f in folds], [f[1] for f in folds], skips)
    assert weights["ensemble"]["flat"] > 0.5 and set(weights["retrieval_flat"]) == {"D", "flat"}
    assert set(first) == {"ensemble", "ensemble_gated", "retrieval_flat"}
    # the flat probabilities carry the signal here: the fitted ensembles find it (gold is retrieved for ~90%)
    assert first["ensemble"].mean() > 0.85 and first["retrieval_flat"].mean() > 0.85
    # When fold 0's own gold labels change to what its retrieval scores (noise here) rank first, which would pull
    # weights fitted on them towards retrieval, its answers do not change: they come from folds 1 and 2
    z0 = folds[0][0]
    scrambled = [({**z0, "gold": z0["I"][np.arange(n), z0["D"].argmax(1)]}, folds[0][1]), *folds[1:]]
    second, _ = fitted_ensembles([f[0] for f in scrambled], [f[1] for f in scrambled], skips)
    old_gold, new_gold = folds[0][0]["gold"], scrambled[0][0]["gold"]
    for name in first:
        was_right = first[name][:n]  # there the answer was the old gold label: now right only where the new one equals it
        assert was_right.sum() > 300 and (second[name][:n][was_right] == (new_gold == old_gold)[was_right]).all()
