"""Stage 3: corrections -> a candidate classifier version -> the promotion gate -> (optionally) served.

Corrections take effect at two speeds:
  exemplars  corrected emails join the label index as exemplars of their label (no training, no encoder
             change: the bi-encoder checksum pinning still holds);
  continued  and the cross-encoder keeps training from the base version (--base-version, default the serving
             one), listwise softmax cross-entropy as in `mailroute train`, on lists of: the gold label + the
             label the system wrongly chose (a guaranteed hard negative) + the retrieval top-K; plus a replay
             sample of the original training emails (`replay_ratio` per correction), mined the same way,
             against forgetting.

The candidate's rerank policy (fusion, temperatures, gate) is fitted again on the frozen evaluation
split for its own scores, as `mailroute train` fits it (unless `keep_policy`).

The gate compares the candidate with the serving version, both run from the repository files on
onnxruntime (what Triton serves), on the frozen evaluation split (the source run's validation split:
never test) and on held-out corrections (a fixed share chosen by the email's hash, never trained on and
never added as exemplars; only real mistakes, where the system had chosen another label). It passes when
accuracy on the held-out corrections improves and the evaluation accuracy drops by at most
`max_eval_drop`; with no held-out correction it cannot pass. The report is saved beside the version
(gate_report.json).
"""

import json
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from mailroute import contract
from mailroute.feedback_store import FeedbackError, FeedbackStore
from mailroute.normalise import InvalidEmail, normalise
from mailroute.repository import (GATE_REPORT_FILE, TORCH_WEIGHTS_DIR, load_label_index, open_onnx_classifier, read_pipeline, source_run,
                                  utc_stamp, version_dir)
from mailroute.rerank_policy import GateTarget
from mailroute.run_layout import RunFolder
from mailroute.settings import DEFAULTS
from mailroute.taxonomy import DataError
from training.data import Example, limit
from training.evaluate import EVAL_BATCH
from training.feedback_config import FeedbackConfig


def held_out(text_hash: str, fraction: float) -> bool:
    """A fixed share of emails, chosen by hash: the same email is held out in every round."""
    return int(text_hash[:8], 16) % 10_000 < fraction * 10_000


def cross_encoder_weights(repo, cross_version: int) -> Path:
    """PyTorch weights of a cross_encoder version: its pytorch/ folder (made by continued training) or
    the run it was exported from."""
    vdir = version_dir(repo, contract.CROSS_ENCODER, cross_version)
    if (vdir / TORCH_WEIGHTS_DIR).is_dir():
        return vdir / TORCH_WEIGHTS_DIR
    for v in sorted(Path(repo, contract.CLASSIFIER).iterdir()):
        if v.name.isdigit():
            spec = read_pipeline(v)
            if spec.cross_encoder_version == cross_version and spec.source_run is not None:
                weights = RunFolder(spec.source_run).cross_encoder
                if weights.is_dir():
                    return weights
    raise FileNotFoundError(f"no PyTorch weights for {contract.CROSS_ENCODER} {cross_version}: neither {vdir / TORCH_WEIGHTS_DIR} "
                            f"nor the run it was exported from exists")


def run_splits(run: Path):
    """(train, validation, its TrainConfig) of a run, the emails exactly as `mailroute train` split them."""
    from training.config import TrainConfig
    from training.data import splits_of

    cfg = TrainConfig.load(RunFolder(run).config)
    _, train, val, _ = splits_of(cfg)
    return train, val, cfg


def accuracy(clf, examples: list, batch: int = EVAL_BATCH):
    """Share of examples answered with their label (None for no examples)."""
    if not examples:
        return None
    hits = 0
    for s in range(0, len(examples), batch):
        rows = examples[s:s + batch]
        preds = clf.classify_texts([e.text for e in rows], [""] * len(rows))
        hits += sum(p.label == e.label for p, e in zip(preds, rows))
    return hits / len(examples)


def gate(repo, serving: int, candidate: int, evaluation: list, held: list, max_eval_drop: float) -> dict:
    """Both versions from the repository files on onnxruntime; -> the gate report (also saved beside the candidate)."""
    t = time.perf_counter()
    out = {}
    for name, v in (("serving", serving), ("candidate", candidate)):
        clf = open_onnx_classifier(repo, v)
        known = [e for e in held if e.label in clf.index.taxonomy]
        out[name] = {"version": v, "evaluation_accuracy": accuracy(clf, evaluation), "corrections_accuracy": accuracy(clf, known)}
    c, s = out["candidate"], out["serving"]
    eval_drop = None if not evaluation else s["evaluation_accuracy"] - c["evaluation_accuracy"]
    corrections_ok = bool(held) and c["corrections_accuracy"] > s["corrections_accuracy"]
    passed = corrections_ok and eval_drop is not None and eval_drop <= max_eval_drop
    why = ("passed" if passed else "no held-out corrections to measure on" if not held else
           "no evaluation emails to measure on" if eval_drop is None else
           "held-out corrections did not improve" if not corrections_ok else f"evaluation accuracy dropped {eval_drop:.2%} > {max_eval_drop:.2%}")
    report = {"passed": bool(passed), "why": why, "serving": s, "candidate": c,
              "evaluation_emails": len(evaluation), "held_out_corrections": len(held), "max_eval_drop": max_eval_drop,
              "eval_drop": eval_drop, "corrections_improved": corrections_ok, "seconds": round(time.perf_counter() - t, 1),
              "date": utc_stamp()}
    path = version_dir(repo, contract.CLASSIFIER, candidate) / GATE_REPORT_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(path)
    return report


def correction_lists(index, scores: np.ndarray, corrections: list, k: int, seed: int, x: np.ndarray = None,
                     exclude: np.ndarray = None) -> dict:
    """Listwise rows for corrections: gold + the wrongly chosen label + the retrieval top-K, deduplicated, shuffled,
    with each candidate's retrieval score (what the loss fuses where the run trained with a retrieval weight).
    The label side as serving reads it (`LabelIndex.pair_cards`; x: the corrections' embeddings, needed where the
    cards show each email's nearest exemplars; exclude: each one's own exemplar row, -1 none)."""
    tax, rng = index.taxonomy, random.Random(seed)
    rows = {"query": [], "docs": [], "retrieval": [], "labels": []}  # the trainer's column order (mining.listwise_rows)
    for n, (c, s) in enumerate(zip(corrections, scores)):
        gold = tax.index(c.label)
        wrong = [tax.index(c.wrong_label)] if c.wrong_label in tax and c.wrong_label != c.label else []
        top = [int(i) for i in np.argsort(-s, kind="stable")[:k]]
        cand = list(dict.fromkeys([gold] + wrong + top))
        rng.shuffle(cand)
        rows["query"].append(c.text)
        rows["docs"].append(index.pair_cards(None if x is None else x[n:n + 1], [cand], None if exclude is None else exclude[n:n + 1]))
        rows["retrieval"].append([float(s[i]) for i in cand])
        rows["labels"].append([int(i == gold) for i in cand])
    return rows


def continue_cross_encoder(repo, base: int, corrections: list, cfg: FeedbackConfig) -> tuple:
    """Continued listwise training from the base version's cross-encoder -> (model, training report)."""
    from training.cross_encoder import train_cross_encoder
    from training.mining import exemplar_rows, listwise_rows, mine_candidates
    from training.models import load_cross_encoder, resolve_device

    t = time.perf_counter()
    device = resolve_device(cfg.device)
    spec = read_pipeline(version_dir(repo, contract.CLASSIFIER, base))
    clf = open_onnx_classifier(repo, base)
    index, k = clf.index, spec.top_k
    examples = [Example(c.text, c.label) for c in corrections]
    x = clf.embed([e.text for e in examples])
    own = exemplar_rows(index, examples)
    scores = index.label_scores(x, exclude=own)  # an exemplar correction does not find itself
    rows = correction_lists(index, scores, corrections, k, cfg.seed, x, own)
    run = Path(cfg.replay_run) if cfg.replay_run else source_run(repo, base)
    train, _, run_cfg = run_splits(run)
    train = [e for e in train if e.label in index.taxonomy]
    n_replay = min(len(train), int(round(cfg.replay_ratio * len(examples))))
    replay = random.Random(cfg.seed).sample(train, n_replay)
    if replay:  # mined as `mailroute train` mined them: leave-one-out, the run's k_train, with retrieval scores
        xr = clf.embed([e.text for e in replay])
        own = exemplar_rows(index, replay)
        cand, sr = mine_candidates(None, None, index, run_cfg.k_train, exclude=own, x=xr)
        rr = listwise_rows(replay, cand, index, cfg.seed, scores=sr, x=xr, exclude=own)
        for key in rows:
            rows[key] += rr[key]
    model = load_cross_encoder(cross_encoder_weights(repo, spec.cross_encoder_version), device=device)
    policy = run_cfg.training_policy()
    if rows["query"]:
        train_cross_encoder(model, rows, cfg.epochs, cfg.batch_size, cfg.lr, cfg.seed, policy, device)
    return model, {"lists": len(rows["query"]), "corrections": len(examples), "replay": len(replay), "replay_run": str(run),
                   "epochs": cfg.epochs, "lr": cfg.lr, "device": device, "seconds": round(time.perf_counter() - t, 1)}


def refit_policy(repo, base: int, index, cross_version: int, evaluation: list, target: GateTarget, flat_fusion: str = "auto") -> tuple:
    """The rerank policy (fusion, temperatures, gate) fitted on the evaluation split for a candidate's own
    scores, as `mailroute train` fits it: a cross-encoder that learnt may now be worth running where the
    serving version's gate skipped it. -> (the policy's JSON form, the two stages' own fit where it fuses the flat
    classifier, else None). flat_fusion: the source run's --flat-fusion (fit_policy)."""
    from mailroute.pipeline import TwoStageClassifier, load_tokenizer
    from mailroute.repository import TOKENIZER_FILE, load_flat_head, onnx_encoders_of
    from training.evaluate import collect, fit_policy

    base_dir = version_dir(repo, contract.CLASSIFIER, base)
    spec = read_pipeline(base_dir)
    bi_dir = version_dir(repo, contract.BI_ENCODER, spec.bi_encoder_version)
    cross_dir = version_dir(repo, contract.CROSS_ENCODER, cross_version)
    k = min(spec.top_k, len(index.taxonomy))
    clf = TwoStageClassifier(onnx_encoders_of(repo, spec, cross_version=cross_version), index,  # the base's flat classifier too
                             load_tokenizer(bi_dir / TOKENIZER_FILE, DEFAULTS.max_email_tokens),
                             load_tokenizer(cross_dir / TOKENIZER_FILE, DEFAULTS.max_pair_tokens), top_k=k,
                             flat_head=load_flat_head(repo, base_dir))
    policies = fit_policy(collect(clf, evaluation, k), target, flat_fusion)
    return policies.gated.to_dict(), None if policies.two_stage_gated is None else policies.two_stage_gated.to_dict()


def build_candidate(cfg: FeedbackConfig, store: FeedbackStore = None) -> dict:
    """Corrections in the store -> a new classifier version, gated (and promoted when asked and passed)."""
    from export import versions
    from export.derive import derive_version, write_cross_encoder_version

    cfg.check()
    repo = Path(cfg.repo)
    serving = versions.current_version(repo)
    base = cfg.base_version or serving
    base_index = load_label_index(repo, version_dir(repo, contract.CLASSIFIER, base))
    # the frozen evaluation split first: without it no candidate can be gated, so nothing is built
    run = Path(cfg.replay_run) if cfg.replay_run else source_run(repo, base)
    if not RunFolder(run).config.exists():
        raise FeedbackError(f"the evaluation split and replay emails come from run {run}, which is not here: pass --replay-run")
    _, evaluation, run_cfg = run_splits(run)
    evaluation = limit([e for e in evaluation if e.label in base_index.taxonomy], cfg.eval_limit, cfg.seed)
    own = store is None
    store = store or FeedbackStore(cfg.db or None, labels=base_index.taxonomy.names)
    try:
        every = store.corrections()
    finally:
        if own:
            store.close()
    already = set(zip(base_index.exemplar_texts, (base_index.taxonomy.names[i] for i in base_index.exemplar_labels)))
    usable = [c for c in every if c.text and c.label in base_index.taxonomy]
    # held out: real mistakes (a confirmation cannot show an improvement) the base has not learnt already
    is_held = [c.wrong_label is not None and held_out(c.text_hash, cfg.holdout_fraction) and (c.text, c.label) not in already
               for c in usable]
    held = [Example(c.text, c.label) for c, h in zip(usable, is_held) if h]
    learn = [c for c, h in zip(usable, is_held) if not h]
    if not learn:
        raise FeedbackError(f"no usable corrections in the store ({len(every)} in all; {len(every) - len(usable)} without text or "
                            f"with a label outside {contract.CLASSIFIER} {base}; {len(held)} held out for the gate)")
    new_exemplars = [(c.text, c.label) for c in learn if (c.text, c.label) not in already]
    report = {"base_version": base, "serving_version": serving, "corrections": len(every), "used": len(learn), "held_out": len(held),
              "skipped": len(every) - len(usable), "new_exemplars": len(new_exemplars), "config": asdict(cfg) | {"admin_key": ""}}
    cross_v = None
    if not cfg.exemplars_only:
        model, report["training"] = continue_cross_encoder(repo, base, learn, cfg)
        pairs = [(c.text, base_index.label_texts[base_index.taxonomy.index(c.label)]) for c in learn[:8]]
        cross_v = write_cross_encoder_version(repo, model, pairs, quantize=read_pipeline(version_dir(repo, contract.CLASSIFIER, base)).quantized)
    policy = policy_without_flat = None
    if not cfg.keep_policy:
        from export.derive import derived_index

        index = derived_index(repo, version_dir(repo, contract.CLASSIFIER, base), new_exemplars)
        cross_now = cross_v or read_pipeline(version_dir(repo, contract.CLASSIFIER, base)).cross_encoder_version
        policy, policy_without_flat = refit_policy(repo, base, index, cross_now, evaluation, run_cfg.gate_target(), run_cfg.flat_fusion)
        report["policy"] = policy
    v = derive_version(repo, base, "exemplars" if cfg.exemplars_only else "continued", new_exemplars, cross_encoder_version=cross_v,
                       policy=policy, policy_without_flat=policy_without_flat,
                       note=f"{len(learn)} corrections ({len(new_exemplars)} new exemplars)",
                       feedback={k: report[k] for k in ("corrections", "used", "held_out", "new_exemplars")})
    report["version"], report["cross_encoder_version"] = v, cross_v
    report["gate"] = gate(repo, serving, v, evaluation, held, cfg.max_eval_drop)  # against what serves, whatever the base
    if cfg.promote and report["gate"]["passed"]:
        report["promotion"] = versions.promote(repo, v, cfg.url or None, cfg.admin_key, note="feedback gate passed")
    return report


def _normalised(examples) -> list:
    """Example texts as the encoders see emails (quoted replies, HTML, spacing cleaned); DataError naming a bad one."""
    out = []
    for i, text in enumerate(examples, 1):
        try:
            out.append(normalise(text))
        except InvalidEmail as e:
            raise DataError(f"--example {i}: {e}") from None
    return out


def add_label(repo, name: str, description: str, examples: list = (), base: int = 0, evaluation: list = ()) -> dict:
    """A new taxonomy entry -> a new classifier version (not served yet), no retraining. With `evaluation`
    (Examples, some of the new label), its zero-shot accuracy: recall on the new label's emails, and the
    accuracy on all of them, before (where the new label cannot be answered) and after."""
    from export import versions
    from export.derive import derive_version, label_from_args

    repo = Path(repo)
    base = base or versions.current_version(repo)
    label = label_from_args(name, description)
    examples = _normalised(examples)  # exemplars are what the encoder sees of an email, as for training and serving
    v = derive_version(repo, base, "label", new_labels=[(label, list(examples))],
                       note=f"label {label.name!r} added ({len(examples)} example(s))")
    report = {"version": v, "base_version": base, "label": label.name, "examples": len(examples), "zero_shot": not examples}
    shown = set(examples)
    evaluation = [e for e in evaluation if e.text not in shown]  # an example is an exemplar: measuring on it says nothing
    if evaluation:
        clf = open_onnx_classifier(repo, v)
        mine = [e for e in evaluation if e.label == label.name]
        predicted = sum(p.label == label.name for s in range(0, len(evaluation), EVAL_BATCH)
                        for p in clf.classify_texts([e.text for e in evaluation[s:s + EVAL_BATCH]], [""] * len(evaluation[s:s + EVAL_BATCH])))
        recall = accuracy(clf, mine)
        report |= {"evaluation_emails": len(evaluation), "new_label_emails": len(mine), "new_label_recall": recall,
                   "new_label_precision": (recall * len(mine) / predicted) if predicted and recall is not None else None,
                   "accuracy_after": accuracy(clf, evaluation), "accuracy_before": accuracy(open_onnx_classifier(repo, base), evaluation)}
    return report
