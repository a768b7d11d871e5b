"""metrics.json -> report.md (the Markdown evaluation report saved next to every run)."""


def _row(name, m):
    r10 = m.get("recall@10")
    return f"| {name} | {m['accuracy']:.2%} | {m['macro_f1']:.4f} | {'' if r10 is None else f'{r10:.2%}'} | {m['ece']:.2%} |"


def write_report(m: dict, path) -> str:
    lines = [f"# Evaluation: {m['dataset']} ({m['labels']} labels)", "",
             f"Emails: train {m['n_train']}, validation {m['n_validation']} (held out of train), test {m['n_test']}.", "",
             "| system | accuracy | macro-F1 | recall@10 | ECE (15 bins) |", "| --- | --- | --- | --- | --- |"]
    if "flat_baseline" in m:
        lines.append(_row("flat softmax baseline", m["flat_baseline"]))
    lines += [_row("bi-encoder only", m["bi_encoder"]), _row(f"two-stage (K={m['two_stage']['k']})", m["two_stage"]), ""]
    lines += ["Bi-encoder retrieval: " + ", ".join(f"{k} {v:.2%}" for k, v in m["retrieval"].items()), "",
              f"Anisotropy (mean cosine of random email pairs): {m['anisotropy']['before']:.3f} before MNR, {m['anisotropy']['after']:.3f} after.", "",
              f"CPU latency per email (batches of {m['latency']['batch_size']}, PyTorch): embed {m['latency']['embed_ms_per_email']:.1f} ms, "
              f"FAISS search {m['latency'].get('search_ms_per_email', float('nan')):.2f} ms, rerank {m['latency'].get('rerank_ms_per_email', float('nan')):.1f} ms; "
              f"whole two-stage {m['latency']['two_stage_ms_per_email']:.1f} ms.", "",
              "Training time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in m["train_time"].items()), "",
              "## Most confused pairs (two-stage, test)", "", "| gold | predicted | count |", "| --- | --- | --- |"]
    lines += [f"| {c['gold']} | {c['predicted']} | {c['count']} |" for c in m["confusions"]]
    if "validation" in m:
        v = m["validation"]
        lines += ["", f"Rerank score = cross-encoder logit + w x retrieval cosine; w = {m['prior_scale']:g} chosen on validation, "
                      f"then a temperature T = {m['temperature']:.3g} fitted there (NLL) for calibration "
                      f"(held out of train; bi-encoder alone {v['bi_encoder']['accuracy']:.2%} there):", "",
                  "| w | validation accuracy | test accuracy (for reference, not used to choose) |", "| --- | --- | --- |"]
        lines += [f"| {w} | {a:.2%} | {m['fusion_accuracy'].get(w, float('nan')):.2%} |" for w, a in v["fusion_accuracy"].items()]
    text = "\n".join(lines) + "\n"
    open(path, "w").write(text)
    return text
