"""`mailroute`: train, export, serve, classify, and the one-command demo.

  mailroute demo                      train on the built-in taxonomy, export, start Triton, classify samples
  mailroute train --dataset banking77 both stages + flat baseline, evaluated, saved to --out
  mailroute refit --run runs/demo     fit the rerank policy (fusion, temperature, gate) again on validation
  mailroute sweep a: b:--oof-folds=3 -- --dataset banking77   several train configurations at once, one summary
  mailroute export --run runs/demo    ONNX (parity-checked) -> new versions in model_repository/
  mailroute serve                     start tritonserver on the repository, print endpoints, stop on Ctrl-C
  mailroute classify "text" a.eml b.jsonl --url 127.0.0.1:8001
"""

import argparse
import dataclasses
import json
import signal
import sys
import time
from pathlib import Path

from mailroute.settings import DEFAULTS, ROOT


def _field_comments(cls) -> dict:
    """The `# comment` after each field of a config dataclass: its --help text (written once, in the config)."""
    import inspect
    import re

    return {m.group(1): m.group(2) for m in re.finditer(r"^\s+(\w+): [^#\n]*#\s*(.+)$", inspect.getsource(cls), re.M)}


def _add_dataclass_args(parser, cls, skip=()):
    """Every field of a config dataclass becomes a --flag with the dataclass default (one source of truth)."""
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action="store_true", help=f"{comments.get(f.name, '')} (default: off)")
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            parser.add_argument(flag, type=typ, default=f.default, help=f"{comments.get(f.name, '')} (default: {f.default!r})")


def _config(cls, args):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def cmd_train(args):
    from training.run import TrainConfig, run

    run(_config(TrainConfig, args))


def cmd_refit(args):
    from training.run import refit

    refit(args.run, args.gate_tolerance, args.device)


def cmd_export(args):
    from export.run import ExportConfig, export

    export(_config(ExportConfig, args))


def _wait_for_signal():
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(1))
    while not stop:
        time.sleep(0.5)


def cmd_serve(args):
    from client.server import TritonServer

    server = TritonServer(args.repo, args.grpc_port, args.http_port, args.metrics_port, explicit=not args.poll_all,
                          admin_key=args.admin_key, log_file=args.log)
    print(f"starting tritonserver on {Path(args.repo).resolve()} (log: {server.log_file}) ...", flush=True)
    server.start(timeout=args.timeout)
    watchdog = readiness = None
    if args.ready_port >= 0:
        from client.watchdog import ReadinessServer, Watchdog

        watchdog = Watchdog(server, interval=args.canary_interval).start()
        readiness = ReadinessServer(watchdog, args.ready_port).start()
    print(f"ready\n  gRPC     {server.grpc_url}\n  HTTP     {server.http_url}\n  metrics  http://127.0.0.1:{server.metrics_port}/metrics"
          + (f"\n  ready    http://127.0.0.1:{readiness.port}/ready  (canary classification every {args.canary_interval:g} s; "
             f"dead backends are reloaded)" if readiness else "") + "\nCtrl-C or SIGTERM stops it.", flush=True)
    try:
        _wait_for_signal()
    finally:
        print("stopping tritonserver ...", flush=True)
        if watchdog:
            watchdog.stop()
            readiness.stop()
        server.stop()
        server.cleanup()


def print_table(rows: list, file=sys.stdout):
    print(f"{'email':<44} {'label':<32} {'prob':>5} {'review':<6} next candidates", file=file)
    for _source, text, r in rows:
        snippet = (text[:41] + "...") if len(text) > 44 else text
        if not r.ok:
            print(f"{snippet:<44} ERROR: {r.error}", file=file)
            continue
        nxt = ", ".join(f"{l} {p:.2f}" for l, p in zip(r.top_labels[1:3], r.top_probabilities[1:3]))
        print(f"{snippet:<44} {r.label:<32} {r.probability:5.2f} {'yes' if r.needs_review else 'no':<6} {nxt}", file=file)


def cmd_classify(args):
    from client import ClassifierClient
    from client.inputs import InputError, read_inputs

    items = args.inputs or [sys.stdin.read()]
    try:
        emails = read_inputs(items)
    except InputError as e:
        sys.exit(f"mailroute classify: {e}")
    if not emails:
        sys.exit("mailroute classify: no emails given")
    with ClassifierClient(args.url, timeout=args.timeout, headers=None) as c:
        results = c.classify([e.text for e in emails], [e.subject for e in emails], top_k=args.top_k, threshold=args.threshold)
    if args.json:
        for e, r in zip(emails, results):
            print(json.dumps({"source": e.source} | dataclasses.asdict(r), ensure_ascii=False))
    else:
        print_table([(e.source, (e.subject + " | " if e.subject else "") + e.text.decode("utf-8", "replace").replace("\n", " "), r)
                     for e, r in zip(emails, results)])


def cmd_demo(args):
    from client import ClassifierClient
    from client.inputs import read_inputs
    from client.server import TritonServer
    from export.run import ExportConfig, export
    from mailroute.repository import versions
    from training.data import DEMO_DIR, load_demo
    from training.run import TrainConfig, run

    t0 = time.time()
    run_dir = Path(args.run)
    if args.retrain or not (run_dir / "metrics.json").exists():
        print("== 1. train both stages on the built-in 50-label email taxonomy", flush=True)
        # K=5 for the small demo: recall@5 of its bi-encoder is ~99% on validation, and it halves rerank cost
        run(TrainConfig(dataset="demo", out=str(run_dir), k_train=5, k_eval=5))
    else:
        print(f"== 1. using the trained run in {run_dir} (--retrain to train again)")
    print(f"\n{(run_dir / 'report.md').read_text()}")
    print("== 2. export ONNX into the Triton model repository", flush=True)
    if args.retrain or not versions(args.repo, "email_classifier"):
        export(ExportConfig(run=str(run_dir), repo=args.repo))
    print("== 3. start Triton and classify sample emails over gRPC", flush=True)
    with TritonServer(args.repo) as server:
        print(f"tritonserver ready: gRPC {server.grpc_url}, HTTP {server.http_url}")
        emails = read_inputs(sorted(str(p) for p in (DEMO_DIR / "samples").glob("*.eml")))
        test = load_demo().test
        with ClassifierClient(server.grpc_url) as c:
            results = c.classify([e.text for e in emails], [e.subject for e in emails])
            print_table([(e.source, e.subject + " | " + e.text.decode().replace("\n", " "), r) for e, r in zip(emails, results)])
            t = time.time()
            preds = c.classify([e.text for e in test])
            secs = time.time() - t
        acc = sum(p.label == e.label for p, e in zip(preds, test)) / len(test)
        print(f"\nheld-out demo test set through Triton: {len(test)} emails, accuracy {acc:.1%}, {len(test) / secs:.1f} emails/s")
    print(f"\ndone in {(time.time() - t0) / 60:.1f} min")


def main(argv=None):
    from export.config import ExportConfig
    from training.config import TrainConfig

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sweep"]:  # its own parser: the flags after `--` belong to every `mailroute train`
        from training.sweep import main as sweep_main

        sys.exit(sweep_main(argv[1:]))

    ap = argparse.ArgumentParser(prog="mailroute", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the main job on the built-in demo taxonomy: train, export, serve, classify")
    p.add_argument("--run", default=str(ROOT / "runs" / "demo"), help="run folder (default: runs/demo)")
    p.add_argument("--repo", default=str(ROOT / "model_repository"), help="model repository (default: model_repository/)")
    p.add_argument("--retrain", action="store_true", help="train and export again even if a run exists")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("train", help="train bi-encoder + cross-encoder (+ flat baseline) and write the evaluation report",
                       description="Dataset: --dataset demo|banking77, or --taxonomy T.json --train A.jsonl --test B.jsonl "
                                   "(format in training/data.py and the README). Invalid data stops training unless --drop-invalid.")
    _add_dataclass_args(p, TrainConfig)
    p.set_defaults(fn=cmd_train)

    sub.add_parser("sweep", help="several `mailroute train` configurations at once (e.g. five on one GPU), one summary table; "
                                 "see `mailroute sweep --help`")

    p = sub.add_parser("refit", help="fit a trained run's rerank policy again on validation (e.g. another gate tolerance), no retraining",
                       description="Scores validation and test again with the run's models, fits fusion, temperature and gate on "
                                   "validation, and rewrites rerank_policy.json, metrics.json and report.md (the flat baseline is kept).")
    p.add_argument("--run", required=True, help="trained run folder")
    p.add_argument("--gate-tolerance", type=float, default=None,
                   help="validation accuracy the gate may give up versus reranking every email (default: the run's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.set_defaults(fn=cmd_refit)

    p = sub.add_parser("export", help="export a trained run to ONNX and write new versions into the Triton model repository")
    _add_dataclass_args(p, ExportConfig)
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("serve", help="start the real tritonserver (from nvidia-pytriton) on a model repository")
    p.add_argument("--repo", default=str(ROOT / "model_repository"))
    p.add_argument("--grpc-port", type=int, default=8001, help="0 = a free port (default: 8001)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--admin-key", default="", help="require header admin-key=<this> for model load/unload/config (recommended)")
    p.add_argument("--poll-all", action="store_true", help="load every model in the repository at start (default: explicit mode, the three mailroute models)")
    p.add_argument("--log", default=None, help="server log file (default: a temporary file)")
    p.add_argument("--timeout", type=float, default=180, help="seconds to wait for readiness")
    p.add_argument("--ready-port", type=int, default=8003,
                   help="port of the proven readiness endpoint /ready (a canary classification; 200 or 503) and /live; "
                        "its watchdog reloads models whose backend process died. 0 = a free port, -1 = off (default: 8003)")
    p.add_argument("--canary-interval", type=float, default=2.0, help="seconds between canary classifications (default: 2)")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("classify", help="classify emails through a running server",
                       description="Inputs: text arguments, .txt or .eml files, .jsonl files (text or subject+body per line); "
                                   "stdin when none are given.")
    p.add_argument("inputs", nargs="*", help="text, or .txt / .eml / .jsonl files")
    p.add_argument("--url", default="127.0.0.1:8001", help="gRPC host:port (default: 127.0.0.1:8001)")
    p.add_argument("--top-k", type=int, default=None, help=f"candidates to rerank (server default: {DEFAULTS.top_k})")
    p.add_argument("--threshold", type=float, default=None, help=f"needs_review below this probability (server default: {DEFAULTS.threshold})")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument("--json", action="store_true", help="one JSON object per email instead of a table")
    p.set_defaults(fn=cmd_classify)

    args = ap.parse_args(argv)
    try:
        args.fn(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # known failure kinds get one clear line, not a traceback
        from mailroute.taxonomy import DataError
        from tritonclient.utils import InferenceServerException

        from mailroute.settings import BadSetting

        if isinstance(e, (DataError, BadSetting, FileNotFoundError, FileExistsError, InferenceServerException)):
            sys.exit(f"mailroute {args.command}: {e}")
        raise


if __name__ == "__main__":
    main()
