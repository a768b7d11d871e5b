"""Which MNR positive makes the better stage 1: the label's text, or another email of the label?

The bi-encoder is fine-tuned with MultipleNegativesRankingLoss on (email, label text) pairs, but stage 1
scores a label by the training emails (exemplars) nearest the email: an email is compared with emails,
never with a description, once the exemplar-aware index is on. Training with email positives (another
email of the same label; in-batch negatives are the other rows' emails, never of the same label) aims
the fine-tuning at that comparison. This trains one bi-encoder per variant from the base weights, builds
the exemplar index as `mailroute train` does, chooses its scoring rule on validation, and reports
retrieval on validation (the choice) and test (shown, never used):

    python -m benchmarks.bi_positives --dataset banking77 --variants description:2 exemplar:2 both:1 \\
        --json benchmarks/results/banking77/bi_positives.json

A variant is POSITIVES:EPOCHS ("both" has two rows an email, so 1 epoch of it costs what 2 of the others do).
--reference-run RUN adds the bi-encoder of a trained run (as trained by `mailroute train`), evaluated the
same way, instead of training the description variant again; --saved NAME=FOLDER adds a bi-encoder saved
by an earlier --save (no training), so runs of several sessions can be paired afterwards:

    python -m benchmarks.bi_positives --variants --saved description:2=runs/bi/description-2 \
        description:4=runs/bi/description-4

Order: the reference run, the saved encoders, then the trained variants. Each is compared with the first on
the same validation emails (paired bootstrap, McNemar).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.paired import bootstrap_interval, mcnemar_p


def _retrieval(index, x: np.ndarray, gold: np.ndarray) -> dict:
    _, ranked = index.search(x, len(index))
    rank = (ranked == gold[:, None]).argmax(1)
    return {"right": rank == 0, **{f"recall@{k}": float(np.mean(rank < k)) for k in (1, 3, 5, 10)}}


def evaluate_encoder(model, tax, train, val, test, cfg) -> dict:
    """The exemplar-aware index of this encoder, its scoring chosen on validation as `mailroute train` does."""
    from training import bi_encoder as bi
    from training.evaluate import choose_scoring

    x_train = bi.embed(model, [e.text for e in train])
    index = bi.build_label_index(model, tax, "study", train, x=x_train, max_exemplars_per_label=cfg.max_exemplars_per_label,
                                 seed=cfg.seed)
    gold = {n: np.array([tax.index(e.label) for e in s]) for n, s in (("val", val), ("test", test))}
    x = {n: bi.embed(model, [e.text for e in s]) for n, s in (("val", val), ("test", test))}
    grid = lambda text, cast: [cast(v) for v in text.split(",")]  # noqa: E731
    scoring, table = choose_scoring(index, x["val"], gold["val"], grid(cfg.top_n_grid, int), grid(cfg.description_weight_grid, float))
    index = index.with_scoring(scoring)
    return {"scoring": {"exemplar_top_n": scoring.exemplar_top_n, "description_weight": scoring.description_weight},
            "val": _retrieval(index, x["val"], gold["val"]), "test": _retrieval(index, x["test"], gold["test"]),
            "anisotropy": bi.anisotropy(model, [e.text for e in test])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--dataset", default="banking77", help="as `mailroute train --dataset` (the same split: --seed, 10%% validation)")
    ap.add_argument("--variants", nargs="*", default=["description:2", "exemplar:2", "both:1"],
                    help="POSITIVES:EPOCHS, POSITIVES one of description, exemplar, both (none: only evaluate --saved / "
                         "--reference-run)")
    ap.add_argument("--saved", nargs="+", default=[], metavar="NAME=FOLDER",
                    help="bi-encoders saved by an earlier --save (trained on this split), evaluated without training")
    ap.add_argument("--reference-run", help="a trained run whose bi-encoder is evaluated first, as the description variant")
    ap.add_argument("--sample-per-label", type=int, default=0, help=">0: train on at most this many emails a label (smoke runs)")
    ap.add_argument("--test-limit", type=int, default=0, help=">0: at most this many test emails")
    ap.add_argument("--seed", type=int, default=None, help="default: mailroute train's")
    from training.config import TrainConfig, add_device_arg  # light: no torch before the flags are read

    add_device_arg(ap)
    ap.add_argument("--precision", default=TrainConfig.precision, help="training arithmetic, as `mailroute train --precision` "
                                                                       f"(default: {TrainConfig.precision})")
    ap.add_argument("--save", help="folder to save each trained bi-encoder in (one subfolder a variant)")
    ap.add_argument("--json", help="write the results here as JSON too")
    a = ap.parse_args(argv)

    from mailroute.run_layout import RunFolder
    from training import bi_encoder as bi
    from training.config import TrainConfig
    from training.data import SPLIT_SETTINGS, splits_of
    from training.models import HF_CONFIG_FILE, autocast_dtype, load_bi_encoder, resolve_device
    from training.run import seed_everything

    variants = []
    for v in a.variants:
        positives, _, epochs = v.partition(":")
        try:
            epochs = float(epochs)
        except ValueError:
            epochs = 0.0
        if positives not in bi.BI_POSITIVES or epochs <= 0:
            ap.error(f"--variants: {v!r} is not POSITIVES:EPOCHS with POSITIVES one of {', '.join(bi.BI_POSITIVES)} and EPOCHS > 0")
        variants.append((positives, epochs))
    saved = [tuple(item.split("=", 1)) for item in a.saved]
    for item, pair in zip(a.saved, saved):
        if len(pair) != 2 or not pair[0] or not (Path(pair[1]) / HF_CONFIG_FILE).is_file():
            ap.error(f"--saved: {item!r} is not NAME=FOLDER with a saved sentence-transformers model in FOLDER")
    if not (variants or saved or a.reference_run):
        ap.error("nothing to compare: give --variants, --saved or --reference-run")
    cfg = TrainConfig(dataset=a.dataset, sample_per_label=a.sample_per_label, test_limit=a.test_limit,
                      **({"seed": a.seed} if a.seed is not None else {}))
    device = resolve_device(a.device)
    if a.reference_run:  # its bi-encoder must not have seen these validation or test emails
        ref = json.loads(RunFolder(a.reference_run).config.read_text())
        differ = [k for k in SPLIT_SETTINGS if ref.get(k, getattr(cfg, k)) != getattr(cfg, k)]
        if differ:
            ap.error(f"--reference-run {a.reference_run} was trained on another split ({', '.join(differ)} differ)")
    tax, train, val, test = splits_of(cfg)
    print(f"{len(tax)} labels, {len(train)} train, {len(val)} validation, {len(test)} test; device {device}, training "
          f"autocast {autocast_dtype(device, a.precision) or 'off (fp32)'}", flush=True)
    results = []
    if a.reference_run:
        t = time.perf_counter()
        r = evaluate_encoder(load_bi_encoder(RunFolder(a.reference_run).bi_encoder, device=device), tax, train, val, test, cfg)
        results.append({"variant": f"description (bi-encoder of {a.reference_run})", "train_s": None, **r})
        print(f"{results[-1]['variant']}: validation {r['val']['recall@1']:.2%} ({time.perf_counter() - t:.0f} s)", flush=True)
    for name, folder in saved:
        r = evaluate_encoder(load_bi_encoder(folder, device=device), tax, train, val, test, cfg)
        results.append({"variant": f"{name} (saved: {folder})", "train_s": None, **r})
        print(f"{results[-1]['variant']}: validation {r['val']['recall@1']:.2%}", flush=True)
    for positives, epochs in variants:
        seed_everything(cfg.seed)
        t = time.perf_counter()
        model = load_bi_encoder(cfg.base or None, device=device)
        bi.train_bi_encoder(model, train, tax, epochs, cfg.bi_batch_size, cfg.bi_lr, cfg.seed, device, positives, a.precision)
        train_s = time.perf_counter() - t
        if a.save:
            model.save(str(Path(a.save) / f"{positives}-{epochs:g}"))
        r = evaluate_encoder(model, tax, train, val, test, cfg)
        results.append({"variant": f"{positives}, {epochs:g} epoch(s)", "train_s": round(train_s, 1), **r})
        print(f"{results[-1]['variant']}: validation {r['val']['recall@1']:.2%} (trained in {train_s / 60:.1f} min)", flush=True)

    first = results[0]
    print(f"\nstage 1 alone (exemplar-aware index, scoring chosen on validation); differences against {first['variant']}")
    print("| variant | scoring (top-n, description weight) | val top-1 | minus first (95% bootstrap), McNemar p | "
          "val recall@3/5/10 | test top-1 | test recall@3/5/10 | anisotropy | train min |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        v, s = r["val"], r["scoring"]
        lo, hi = bootstrap_interval(v["right"], first["val"]["right"])
        diff = 100 * (v["right"].mean() - first["val"]["right"].mean())
        train_min = "" if r["train_s"] is None else f"{r['train_s'] / 60:.1f}"
        r["val_minus_first"] = {"points": diff, "bootstrap95": [lo, hi], "mcnemar_p": mcnemar_p(v["right"], first["val"]["right"])}
        print(f"| {r['variant']} | {s['exemplar_top_n']}, {s['description_weight']:g} | {v['recall@1']:.2%} | "
              f"{diff:+.2f} ({lo:+.2f}..{hi:+.2f}), p={r['val_minus_first']['mcnemar_p']:.2f} | "
              f"{v['recall@3']:.2%} / {v['recall@5']:.2%} / {v['recall@10']:.2%} | {r['test']['recall@1']:.2%} | "
              f"{r['test']['recall@3']:.2%} / {r['test']['recall@5']:.2%} / {r['test']['recall@10']:.2%} | "
              f"{r['anisotropy']:.3f} | {train_min} |")
    if a.json:
        for r in results:
            for split in ("val", "test"):
                r[split].pop("right")
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
