"""metrics.json -> report.md (the Markdown evaluation report saved next to every run), with the
variants table (validation and test side by side), the closest label pairs and the abstention plot."""

import numpy as np

from mailroute.rerank_policy import RerankPolicy
from training.evaluate import ECE_BINS

VARIANT_NAMES = {
    "bi_encoder_descriptions": "bi-encoder, label descriptions only (stage 1 as before)",
    "bi_encoder": "bi-encoder, exemplar-aware label index (stage 1)",
    "cross_encoder_only": "cross-encoder alone over the K candidates",
    "retrieval_flat": "retrieval + flat classifier, no cross-encoder",
    "two_stage_without_flat": "two-stage without the flat classifier, every email reranked",
    "two_stage_ungated": "two-stage, fused, gate off (every email reranked where the cross-encoder has weight)",
    "two_stage": "two-stage, fused, gated (served default)",
}


def _pct(v):
    return "" if v is None else f"{v:.2%}"


def _row(name, m):
    return f"| {name} | {m['accuracy']:.2%} | {m['macro_f1']:.4f} | {_pct(m.get('recall@10'))} | {_pct(m.get('ece'))} |"


CLOSE_PAIRS = 10  # label pairs the report follows (by description cosine)


def closest_pairs(index, n: int = CLOSE_PAIRS) -> list:
    """The n label pairs whose descriptions are closest (cosine of the description embeddings)."""
    xb = index.index.reconstruct_n(0, index.index.ntotal)  # (labels, dim), normalised
    sim = xb @ xb.T
    iu = np.triu_indices(len(xb), 1)
    order = np.argsort(-sim[iu], kind="stable")[:n]
    names = index.taxonomy.names
    return [(names[iu[0][o]], names[iu[1][o]], float(sim[iu][o])) for o in order]


def pair_errors(gold, pred, a: str, b: str) -> int:
    """Emails of label a predicted as b or of b predicted as a."""
    return int(sum((g == a and p == b) or (g == b and p == a) for g, p in zip(gold, pred)))


def abstention_curve(correct, confidence, steps: int = 51) -> tuple:
    """Send the least confident share s of emails to review: -> (shares, accuracy of the accepted rest)."""
    order = np.argsort(-np.asarray(confidence), kind="stable")
    ok = np.asarray(correct, dtype=float)[order]
    shares = np.linspace(0, 0.5, steps)
    acc = [ok[: max(1, int(round(len(ok) * (1 - s))))].mean() for s in shares]
    return shares, np.array(acc)


def abstention_plot(path, curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, (shares, acc) in curves.items():
        ax.plot(100 * shares, 100 * acc, label=name)
    ax.set_xlabel("emails sent to review (least confident first), %")
    ax.set_ylabel("accuracy of the accepted emails, %")
    ax.set_title("Abstention on the test split")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def mining_line(m: dict) -> str:
    """The report's mining sentence: K is the run's k_train (the candidates mined), not the evaluation K; metrics.json
    files from before mining recorded its K fall back to the evaluation K they always showed."""
    mining = m["mining"]
    k = mining.get("k_train", m["k"])
    return f"Mining: {mining['how']}; gold among the top-{k} candidates of {mining['gold_retrieved_train']:.1%} of training emails."


def write_report(m: dict, run, index, gold, pred, conf, flat_pred=None, flat_conf=None) -> str:
    lines = [f"# Evaluation: {m['dataset']} ({m['labels']} labels)", "",
             f"Emails: train {m['n_train']}, validation {m['n_validation']} (held out of train), test {m['n_test']}. "
             f"Device: {m['device']}. K = {m['k']}."
             + (f" The cross-encoder started from the {m['cross_encoder_start']} weights (--ce-init)." if m.get("cross_encoder_start", "base") != "base" else ""),
             "",
             f"| system (test) | accuracy | macro-F1 | recall@10 | ECE ({ECE_BINS} bins) |", "| --- | --- | --- | --- | --- |"]
    if "flat_baseline" in m:
        lines.append(_row("flat softmax baseline", m["flat_baseline"]))
    lines += [_row("bi-encoder only", m["bi_encoder"]), _row(f"two-stage (K={m['k']}, gated)", m["two_stage"]), ""]
    g = m["gate"]
    if g.get("reranker_weightless"):
        lines += ["The fusion fitted on validation gives the cross-encoder no weight (its logits did not help the other scores), "
                  "so stage 2 never runs (no gate needed): the answer is the retrieval score fused with what else the policy holds.", ""]
    else:
        lines += [f"Gate: stage 2 skipped when the retrieval margin (top-1 minus top-2 score) exceeds {g['margin']}: "
                  f"{m['two_stage']['share_reranked']:.1%} of test emails reranked "
                  f"(validation: {g['share_reranked']:.1%}, accuracy {g['accuracy_gated']:.2%} gated vs {g['accuracy_ungated']:.2%} ungated"
                  + (f"; rerank budget {g['rerank_budget']:.0%}" + ("" if g.get("within_budget", True) else ", exceeded: validation accuracy needed more")
                     if "rerank_budget" in g else "") + ").", ""]
    lines += ["## Variants (every choice made on validation; test shown beside it, never used to choose)", "",
              "| variant | validation accuracy | test accuracy | test ECE | share reranked (test) |", "| --- | --- | --- | --- | --- |"]
    for key, name in VARIANT_NAMES.items():
        v, t = m["variants"]["validation"].get(key), m["variants"]["test"].get(key)
        if v and t:
            lines.append(f"| {name} | {v['accuracy']:.2%} | {t['accuracy']:.2%} | {_pct(t.get('ece'))} | {_pct(t.get('share_reranked'))} |")
    ff = m.get("flat_fusion")
    if ff:  # a run with the flat classifier: whether its answer fuses it (held-out likelihood on validation)
        lines += ["", f"Flat classifier {'fused into' if ff['fused'] else 'not fused into'} the answer (--flat-fusion {ff['mode']}): the held-out NLL of "
                      f"validation's gold candidates ({ff['folds']}-fold, reranked + gated fits) is {ff['cv_nll_with_flat']:.1f} "
                      f"with it and {ff['cv_nll_without_flat']:.1f} without."]
    lines += ["", f"Rerank policy (fitted by NLL on validation): {RerankPolicy.from_dict(m['policy']).describe()}.",
              f"Label scoring (chosen on validation): {m['label_scoring']}.", "",
              mining_line(m), "",
              "Bi-encoder retrieval (test): " + ", ".join(f"{k} {v:.2%}" for k, v in m["retrieval"].items()), "",
              f"Anisotropy (mean cosine of random email pairs): {m['anisotropy']['before']:.3f} before MNR, {m['anisotropy']['after']:.3f} after.", "",
              latency_line(m), "",
              "Training time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in m["train_time"].items()), ""]
    # closest label pairs: errors between them, flat vs two-stage
    lines += [f"## The {CLOSE_PAIRS} closest label pairs (description cosine): errors between them on test", "",
              "| label a | label b | cosine | two-stage errors | flat errors |", "| --- | --- | --- | --- | --- |"]
    pairs = []
    for a, b, c in closest_pairs(index):
        two = pair_errors(gold, pred, a, b)
        flat = pair_errors(gold, flat_pred, a, b) if flat_pred is not None else None
        pairs.append({"a": a, "b": b, "cosine": c, "two_stage_errors": two, "flat_errors": flat})
        lines.append(f"| {a} | {b} | {c:.3f} | {two} | {'' if flat is None else flat} |")
    m["closest_pairs"] = pairs
    # abstention
    curves = {"two-stage": abstention_curve(np.array(gold) == np.array(pred), conf)}
    if flat_pred is not None:
        curves["flat softmax"] = abstention_curve(np.array(gold) == np.array(flat_pred), flat_conf)
    abstention_plot(run.abstention_plot, curves)
    m["abstention"] = {name: {f"{s:.2f}": float(a) for s, a in zip(*c) if round(s * 100) % 10 == 0} for name, c in curves.items()}
    lines += ["", f"## Abstention: ![accuracy of accepted emails vs share sent to review]({run.abstention_plot.name})", "",
              "| share sent to review | " + " | ".join(curves) + " |", "| --- |" + " --- |" * len(curves)]
    for s in m["abstention"]["two-stage"]:
        lines.append(f"| {float(s):.0%} | " + " | ".join(f"{m['abstention'][n][s]:.2%}" for n in curves) + " |")
    lines += ["", "## Most confused pairs (two-stage, test)", "", "| gold | predicted | count |", "| --- | --- | --- |"]
    lines += [f"| {c['gold']} | {c['predicted']} | {c['count']} |" for c in m["confusions"]]
    text = "\n".join(lines) + "\n"
    run.report.write_text(text)
    return text


def latency_line(m: dict) -> str:
    """Per-email cost of each stage as evaluation measured it (stage 2 timed for every email), and what the served
    policy costs: stage 2 only for the share it reranks (none where the cross-encoder has no weight)."""
    lat, share = m["latency"], m["two_stage"].get("share_reranked", 1.0)
    flat = lat.get("flat_ms_per_email", 0.0)  # metrics written before the flat pass was timed apart count it in embed
    # a run may keep its flat classifier without fusing it (--flat-fusion auto): then serving never runs its pass
    served_flat = flat if RerankPolicy.from_dict(m["policy"]).uses_flat else 0.0
    served = lat["embed_ms_per_email"] + served_flat + lat["search_ms_per_email"] + share * lat["rerank_ms_per_email"]
    return (f"Latency per email (batches of {lat['batch_size']}, PyTorch on {m['device']}): embed {lat['embed_ms_per_email']:.1f} ms"
            + (f", flat classifier {flat:.1f} ms" if flat else "") + f", search {lat['search_ms_per_email']:.2f} ms, rerank "
            f"{lat['rerank_ms_per_email']:.1f} ms (timed for every email); as served, stage 2 for {share:.0%} of emails: "
            f"{served:.1f} ms per email.")
