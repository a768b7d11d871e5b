r"""`mailroute sweep`: several `mailroute train` configurations at once on one machine (one GPU card
fits five BANKING77 runs), each in its own process, every run's metrics.json and report.md gathered
into one folder with a summary table (validation beside test; choose on validation).

    mailroute sweep --out runs/sweep --parallel 5 \
        base: \
        oof3:--oof-folds=3 \
        ce3:--ce-epochs=3 \
        nocards:--card-examples=0 \
        flat6:--flat-epochs=6 -- --dataset banking77 --device auto

Each configuration is NAME:--flag=value[,--flag=value...] (flags of `mailroute train`; `NAME:` alone = the
defaults); the flags after `--` apply to every run. A configuration whose folder already holds a trained run is refused before
anything starts, unless its flags (or those after `--`) say --overwrite. Each process gets OMP_NUM_THREADS = cores / parallel, so runs sharing a card do
not fight over the CPU that feeds it.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mailroute.run_layout import METRICS_FILE, REPORT_FILE
from mailroute.settings import DEFAULT_RUN, BadSetting, shown


def parse_config(spec: str) -> tuple:
    """'name:--flag=value,--other=v' -> (name, ['--flag', 'value', '--other', 'v'])."""
    name, _, rest = spec.partition(":")
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise BadSetting(f"configuration {spec!r}: expected NAME[:--flag=value,...] with a plain NAME")
    args = []
    for item in filter(None, rest.split(",")):
        flag, eq, value = item.partition("=")
        if not flag.startswith("--"):
            raise BadSetting(f"configuration {spec!r}: {item!r} is not a --flag=value")
        args += [flag] + ([value] if eq else [])
    return name, args


def summary_row(name: str, m: dict) -> str:
    v, t = m["variants"]["validation"], m["variants"]["test"]
    flat = m.get("flat_baseline", {})
    flat_val = max(flat.get("validation_by_epoch") or [float("nan")])  # the kept epoch is the best on validation
    flat_test = flat.get("accuracy")
    return (f"| {name} | {v['bi_encoder']['accuracy']:.2%} | {v['two_stage_ungated']['accuracy']:.2%} | {v['two_stage']['accuracy']:.2%} | "
            f"{'' if flat_test is None else f'{flat_val:.2%}'} | "
            f"{t['bi_encoder']['accuracy']:.2%} | {t['two_stage_ungated']['accuracy']:.2%} | {t['two_stage']['accuracy']:.2%} | "
            f"{t['two_stage']['share_reranked']:.1%} | {'' if flat_test is None else f'{flat_test:.2%}'} | {sum(m['train_time'].values()) / 60:.1f} |")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    common = []
    if "--" in argv:
        i = argv.index("--")
        argv, common = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="mailroute sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+", help="NAME[:--flag=value,...] per run")
    out = DEFAULT_RUN.parent / "sweep"  # beside the default run, in this checkout whatever the working directory
    ap.add_argument("--out", default=str(out), help=f"parent folder of the runs and the summary (default: {shown(out)})")
    ap.add_argument("--parallel", type=int, default=5, help="runs at once (default 5)")
    ap.add_argument("--threads", type=int, default=0,
                    help="OMP/MKL threads per run (default: cores / --parallel; set it when another sweep shares the machine)")
    a = ap.parse_args(argv)
    if a.parallel < 1:  # no run would ever start, and the loop below would wait forever
        raise SystemExit(f"mailroute sweep: --parallel must be >= 1 (runs at once), got {a.parallel}")
    if a.threads < 0:
        raise SystemExit(f"mailroute sweep: --threads must be >= 1 (or 0: cores / --parallel), got {a.threads}")
    try:
        configs = [parse_config(c) for c in a.configs]
    except BadSetting as e:
        raise SystemExit(f"mailroute sweep: {e}") from None
    if len({n for n, _ in configs}) != len(configs):
        raise SystemExit("mailroute sweep: configuration names must be unique")
    out = Path(a.out)
    from mailroute.cli import refuse_trained_out

    for name, args in configs:  # refused before anything starts, not one run at a time (its log would be replaced too)
        try:
            refuse_trained_out(out / name, "--overwrite" in common + args, flag=f"configuration {name!r}: --out")
        except BadSetting as e:
            raise SystemExit(f"mailroute sweep: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    threads = a.threads or max(1, (os.cpu_count() or 2) // a.parallel)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    pending, running, results = list(configs), {}, {}
    t0 = time.time()
    while pending or running:
        while pending and len(running) < a.parallel:
            name, args = pending.pop(0)
            cmd = [sys.executable, "-m", "mailroute.cli", "train", "--out", str(out / name), *common, *args]
            log = open(out / f"{name}.log", "w")
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, cmd)
            print(f"[{time.time() - t0:6.0f} s] started {name}: {' '.join(cmd[3:])}", flush=True)
        for name, (proc, log, cmd) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            metrics = out / name / METRICS_FILE
            results[name] = {"returncode": proc.returncode, "command": " ".join(cmd[3:])}
            if proc.returncode == 0 and metrics.exists():
                results[name]["metrics"] = json.loads(metrics.read_text())
            print(f"[{time.time() - t0:6.0f} s] {name} finished with exit code {proc.returncode} (log {out / f'{name}.log'})", flush=True)
        time.sleep(2)
    lines = ["| run | val bi | val two-stage | val gated | val flat | test bi | test two-stage | test gated | test reranked | test flat | train min |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [summary_row(n, r["metrics"]) for n, r in results.items() if "metrics" in r]
    failed = [n for n, r in results.items() if "metrics" not in r]
    table = "\n".join(lines) + ("\n\nfailed: " + ", ".join(failed) if failed else "") + "\n"
    (out / "summary.md").write_text(table)
    (out / "summary.json").write_text(json.dumps({n: {k: v for k, v in r.items()} for n, r in results.items()}, indent=1) + "\n")
    print(table)
    print(f"reports: {', '.join(str(out / n / REPORT_FILE) for n in results if 'metrics' in results[n])}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
