"""`mailroute`: train, export, serve, classify, and the one-command demo.

  mailroute demo                      train on the built-in taxonomy, export, start Triton, classify samples
  mailroute taxonomy train.csv --out t.json   draft a taxonomy from the labels of example files (then --taxonomy t.json)
  mailroute train --dataset banking77 both stages + the flat classifier (fused where validation's held-out likelihood says so), evaluated, saved to --out
  mailroute refit --run runs/demo     fit the rerank policy (fusion, temperature, gate) again on validation
  mailroute sweep a: b:--oof-folds=3 -- --dataset banking77   several train configurations at once, one summary
  mailroute export --run runs/demo    ONNX (parity-checked) -> new versions in model_repository/
  mailroute serve                     start tritonserver on the repository, print endpoints, stop on Ctrl-C
  mailroute classify "text" a.eml b.jsonl --url 127.0.0.1:8001 [--record]
  mailroute feedback add --prediction ID --label L | import corrections.jsonl | status | train [--promote]
  mailroute versions list | promote V | rollback | prune --keep 3
  mailroute labels add --name N --description "..." [--example "..."]
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from mailroute.contract import CLASSIFIER
from mailroute.settings import (CANARY_INTERVAL_S, DEFAULT_GRPC_URL, BadSetting, DEFAULT_REPOSITORY, DEFAULT_RUN, DEFAULTS, GRPC_PORT, HTTP_PORT,
                                METRICS_PORT, PRUNE_KEEP, READY_PORT, REQUEST_TIMEOUT_S, SERVER_START_TIMEOUT_S, shown)


def _field_comments(cls) -> dict:
    """The `# comment` after each field of a config dataclass: its --help text (written once, in the config)."""
    import inspect
    import re

    return {m.group(1): m.group(2) for m in re.finditer(r"^\s+(\w+): [^#\n]*#\s*(.+)$", inspect.getsource(cls), re.M)}


def _add_device_arg(parser) -> None:
    from training.config import add_device_arg

    add_device_arg(parser)


def _add_dataclass_args(parser, cls, skip=()):
    """Every field of a config dataclass becomes a --flag with the dataclass default (one source of truth); its help is
    the field's metadata "help" (text rendered from elsewhere, e.g. the runtime registry), else its comment."""
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata.get("help", comments.get(f.name, ""))
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action="store_true", help=f"{text} (default: off)")
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            said = f.default == "" and "(default" in text  # the comment already says what an empty value stands for
            parser.add_argument(flag, type=typ, default=f.default, help=text if said else f"{text} (default: {shown(f.default)})")


def _config(cls, args):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def refuse_trained_out(out, overwrite: bool, flag: str = "--out") -> None:
    """A finished run (its metrics.json) is hours of training: `mailroute train` writes over one only when told to."""
    from mailroute.run_layout import RunFolder

    if not overwrite and RunFolder(out).metrics.exists():
        raise BadSetting(f"{flag} {shown(str(out))} already holds a trained run: name another folder, or pass --overwrite to train over it")


def cmd_train(args):
    from training.run import TrainConfig, run

    refuse_trained_out(args.out, args.overwrite)
    run(_config(TrainConfig, args))


def cmd_taxonomy(args):
    from training.data import draft_taxonomy

    out = Path(args.out)
    if out.is_dir():
        raise FileExistsError(f"{out} is a folder: --out names the taxonomy JSON file to write")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists: name another --out, or pass --overwrite")
    tax = draft_taxonomy(args.examples, args.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tax.save(out)
    print(f"wrote {out}: {len(tax)} labels from {', '.join(args.examples)}, each described by its own name (a sentence of what "
          f"each label means can replace it: benchmarks/RESULTS.md measures both on BANKING77); then\n"
          f"  mailroute train --taxonomy {out} --train TRAIN --test TEST --out runs/NAME")


def cmd_refit(args):
    from training.run import refit

    refit(args.run, args.gate_tolerance, args.rerank_budget, args.device)


def cmd_baseline(args):
    from training.run import retrain_baseline

    retrain_baseline(args.run, args.flat_epochs, args.flat_lr, args.device)


def cmd_resume(args):
    from training.run import resume

    resume(args.run, args.out, args.ce_epochs, args.ce_lr, args.device)


def cmd_export(args):
    from export.run import ExportConfig, export

    export(_config(ExportConfig, args))


def _serve_until_stopped(server, watched: bool):
    """Until Ctrl-C or SIGTERM (a KeyboardInterrupt under sigterm_as_interrupt). Unwatched, a tritonserver that exits
    on its own ends the launcher with its log tail; watched, the watchdog restarts it (and reports it on /ready)."""
    from client.server import ServerStartError

    try:
        while watched or server.proc.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        return
    raise ServerStartError(f"tritonserver exited with {server.proc.returncode} while serving (no watchdog: --ready-port -1)",
                           server.tail())


def cmd_serve(args):
    from client.server import sigterm_as_interrupt

    with sigterm_as_interrupt():  # from here on, SIGTERM stops the server too (it runs in its own session)
        _serve(args)


def _serve(args):
    from client.server import TritonServer, signals_held

    if args.ready_port < -1:
        raise BadSetting(f"--ready-port must be a port, 0 for a free one or -1 for none, got {args.ready_port}")
    if args.ready_port >= 0 and not args.canary_interval > 0:  # refused before a server starts, not by the watchdog after
        raise BadSetting(f"--canary-interval must be a number of seconds > 0, got {args.canary_interval:g}")
    server = TritonServer(args.repo, args.grpc_port, args.http_port, args.metrics_port, explicit=not args.poll_all,
                          admin_key=args.admin_key, log_file=args.log)
    watchdog = readiness = None
    try:  # a failed start (or a taken readiness port) still stops the server and removes its temporary folder
        server.check_repository()  # a wrong --repo is refused before anything is launched
        server.check_log_file()  # and so is a --log that cannot be written
        if args.ready_port >= 0:  # and so are ports that cannot be listened on, readiness's too (-1 = off)
            server.check_ports(more=(("readiness", args.ready_port, "--ready-port"),))
        print(f"starting tritonserver on {server.repo} (log: {server.log_file}) ...", flush=True)
        server.start(timeout=args.timeout)
        if args.ready_port >= 0:
            from client.watchdog import ReadinessServer, Watchdog

            watchdog = Watchdog(server, interval=args.canary_interval).start()
            readiness = ReadinessServer(watchdog, args.ready_port).start()
        print(f"ready\n  gRPC     {server.grpc_url}\n  HTTP     {server.http_url}\n  metrics  http://127.0.0.1:{server.metrics_port}/metrics"
              + (f"\n  ready    http://127.0.0.1:{readiness.port}/ready  (canary classification every {args.canary_interval:g} s; "
                 f"dead backends are reloaded)" if readiness else "") + "\nCtrl-C or SIGTERM stops it.", flush=True)
        _serve_until_stopped(server, watched=watchdog is not None)
    finally:
        with signals_held():  # a second Ctrl-C / SIGTERM must not cut the stop short
            if server.proc is not None:
                print("stopping tritonserver ...", flush=True)
            if readiness:
                readiness.stop()
            if watchdog:
                watchdog.stop()
            server.stop()
            server.cleanup()


def print_table(rows: list, file=None):
    file = file or sys.stdout  # looked up at call time (a default bound at import keeps a stream replaced since)
    print(f"{'email':<44} {'label':<32} {'prob':>5} {'review':<6} next candidates", file=file)
    for _source, text, r in rows:
        snippet = (text[:41] + "...") if len(text) > 44 else text
        if not r.ok:
            print(f"{snippet:<44} ERROR: {r.error}", file=file)
            continue
        nxt = ", ".join(f"{l} {p:.2f}" for l, p in zip(r.top_labels[1:3], r.top_probabilities[1:3]))
        print(f"{snippet:<44} {r.label:<32} {r.probability:5.2f} {'yes' if r.needs_review else 'no':<6} {nxt}", file=file)


def _check_grpc_url(url: str) -> None:
    if url.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):  # gRPC's own target schemes: its resolver checks them
        return
    host, _, port = url.rpartition(":")
    if "://" in url or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise BadSetting(f"--url must be a running server's gRPC host:port, like {DEFAULT_GRPC_URL}, got {url!r}")


def cmd_classify(args):
    from client import ClassifierClient
    from client.inputs import InputError, read_inputs, read_stdin

    if not args.timeout > 0:
        raise BadSetting(f"--timeout must be seconds > 0, got {args.timeout:g}")

    try:  # piped text is one email, never a file name (an email is no valid path: too long, or several lines)
        emails = read_inputs(args.inputs) if args.inputs else read_stdin(getattr(sys.stdin, "buffer", sys.stdin).read())
    except InputError as e:
        sys.exit(f"mailroute classify: {e}")
    if not emails:
        sys.exit("mailroute classify: no emails given")
    from mailroute.feedback_store import FeedbackStore

    store = FeedbackStore(args.db or None, store_text=not args.hash_only) if args.record else None  # labels come from the server
    try:
        with ClassifierClient(args.url, timeout=args.timeout, headers=None, store=store) as c:
            results = c.classify([e.text for e in emails], [e.subject for e in emails], top_k=args.top_k, threshold=args.threshold,
                                 record=args.record)
    finally:
        if store is not None:
            store.close()
    if args.json:
        for e, r in zip(emails, results):
            print(json.dumps({"source": e.source} | dataclasses.asdict(r), ensure_ascii=False))
    else:
        print_table([(e.source, (e.subject + " | " if e.subject else "") + e.text.decode("utf-8", "replace").replace("\n", " "), r)
                     for e, r in zip(emails, results)])
        if args.record:
            print("prediction ids (for `mailroute feedback add --prediction ID --label L`): "
                  + " ".join(r.prediction_id or "-" for r in results))


def _serving_labels(repo):
    """Label names of the serving classifier version (what corrections may name); refuses a repository without one,
    since a correction to a label nobody serves would be stored and then fail the next feedback round."""
    from export.versions import serving_version
    from mailroute import contract
    from mailroute.repository import load_label_index, version_dir, versions

    if not versions(repo, contract.CLASSIFIER):
        raise FileNotFoundError(f"--repo {repo} holds no {contract.CLASSIFIER} version: corrections are checked against the "
                                f"serving version's labels; name the model repository the server runs")
    return load_label_index(repo, version_dir(repo, contract.CLASSIFIER, serving_version(repo))).taxonomy.names


def _store(args, check_labels: bool = True):
    from mailroute.feedback_store import FeedbackStore

    labels = _serving_labels(args.repo) if check_labels else None  # None: any label (counting needs none)
    return FeedbackStore(args.db or None, labels=labels, store_text=not getattr(args, "hash_only", False))


def _was(event: dict) -> str:
    return "already serving" if event.get("previous") is None else f"was v{event['previous']}"


def cmd_feedback(args):
    from dataclasses import asdict

    if args.action == "train":
        from training.feedback import FeedbackConfig, build_candidate

        from export.versions import format_gate

        report = build_candidate(_config(FeedbackConfig, args))
        g = report["gate"]
        if args.json:
            print(json.dumps(report, indent=1, default=str))
            return
        print(f"{'exemplars' if args.exemplars_only else 'exemplars + continued training'}: {CLASSIFIER} v{report['version']} from "
              f"v{report['base_version']} ({report['used']} corrections, {report['new_exemplars']} new exemplars, "
              f"{report['held_out']} held out)\ngate against serving v{report['serving_version']}: {format_gate(g)}")
        if "promotion" in report:
            print(f"promoted: v{report['version']} serves" + ("" if args.url else " once the server loads it (no --url given)"))
        else:
            print("not promoted" + (" (--promote serves a candidate that passes)" if g["passed"] else ""))
        return
    with _store(args, check_labels=args.action in ("add", "import")) as store:
        if args.action == "add":
            c = store.correct(args.prediction, args.label, text=args.text, who=args.who, source="cli")
            print(json.dumps(asdict(c), default=str) if args.json else f"correction {c.id}: {c.label}"
                  + (f" (was {c.wrong_label})" if c.wrong_label else ""))
        elif args.action == "import":
            n = store.import_file(args.file, who=args.who)
            print(f"imported {n} corrections from {args.file}")
        else:
            print(json.dumps(store.counts()))


def cmd_versions(args):
    from export import versions

    if args.action != "list" and args.json:
        print("note: --json applies to `versions list`", file=sys.stderr)
    if args.action == "list":
        rows = versions.list_versions(args.repo)
        print(json.dumps(rows, indent=1) if args.json else versions.format_versions(rows))
    elif args.action == "promote":
        e = versions.promote(args.repo, args.version, args.url or None, args.admin_key)
        print(f"{CLASSIFIER} v{e['version']} serves ({_was(e)})" + ("" if args.url else "; no --url: takes effect when the server loads it"))
    elif args.action == "rollback":
        e = versions.rollback(args.repo, args.url or None, args.admin_key, args.to)
        print(f"rolled back: {CLASSIFIER} v{e['version']} serves ({_was(e)})")
    else:
        removed = versions.prune(args.repo, args.keep, args.url or None, args.admin_key)
        print("removed: " + ", ".join(f"{m} {v}" for m, v in removed.items()))


def cmd_labels(args):
    from training.data import load_examples
    from training.feedback import add_label

    evaluation = []
    if args.eval:
        from mailroute import contract
        from mailroute.repository import load_label_index, version_dir
        from mailroute.taxonomy import Taxonomy
        from export.derive import label_from_args
        from export.versions import serving_version

        base = load_label_index(args.repo, version_dir(args.repo, contract.CLASSIFIER, args.base or serving_version(args.repo))).taxonomy
        evaluation = load_examples(Path(args.eval), Taxonomy(base.labels + (label_from_args(args.name, args.description),), base.name))
    report = add_label(args.repo, args.name, args.description, args.example, args.base, evaluation)
    if args.promote:
        from export.versions import promote

        report["promotion"] = promote(args.repo, report["version"], args.url or None, args.admin_key, note=f"label {args.name} added")
    print(json.dumps(report, indent=1, default=str))


def _served_run(repo):
    """The training run behind the serving classifier version (None: no version, or one that records none)."""
    from export.versions import serving_version
    from mailroute.repository import source_run, versions

    if not versions(repo, CLASSIFIER):
        return None
    try:
        return source_run(repo, serving_version(repo)).resolve()
    except FileNotFoundError:
        return None


def cmd_demo(args):
    from client import ClassifierClient
    from client.inputs import read_inputs
    from client.server import TritonServer
    from export.run import ExportConfig, export
    from export.versions import serving_version
    from mailroute.run_layout import RunFolder
    from training.data import DEMO_DIR, load_demo
    from training.run import TrainConfig, run

    t0 = time.time()
    run_dir = Path(args.run)
    run_folder = RunFolder(run_dir)
    if args.retrain or not run_folder.metrics.exists():
        print("== 1. train both stages on the built-in 50-label email taxonomy", flush=True)
        run(TrainConfig(dataset="demo", out=str(run_dir)))
    else:
        print(f"== 1. using the trained run in {run_dir} (--retrain to train again)")
    print(f"\n{run_folder.report.read_text()}")
    print("== 2. export ONNX into the Triton model repository", flush=True)
    if args.retrain or _served_run(args.repo) != run_dir.resolve():  # what serves must be this run (or derive from it)
        export(ExportConfig(run=str(run_dir), repo=args.repo))
    else:
        print(f"{CLASSIFIER} v{serving_version(args.repo)} already serves this run")
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


REPO_HELP = f"model repository (default: {shown(DEFAULT_REPOSITORY)})"


def _store_args(p, repo=True, writes=True):
    """--db; --repo where corrections are checked against the serving labels; --hash-only where text is written."""
    from mailroute.settings import DEFAULT_FEEDBACK_URL, FEEDBACK_URL_ENV

    p.add_argument("--db", default="", help=f"feedback store URL, any SQLAlchemy URL (default: ${FEEDBACK_URL_ENV}, else {DEFAULT_FEEDBACK_URL})")
    if repo:
        p.add_argument("--repo", default=str(DEFAULT_REPOSITORY), help=REPO_HELP + "; corrections must name its serving labels")
    if writes:
        p.add_argument("--hash-only", action="store_true", help="privacy: keep only a hash of each email's text")


def _server_args(p):
    p.add_argument("--repo", default=str(DEFAULT_REPOSITORY), help=REPO_HELP)
    p.add_argument("--url", default="", help="running server's gRPC host:port: load the change into it (default: only the files change, "
                                             "a server loads them at its next load or start)")
    p.add_argument("--admin-key", default="", help="the server's admin key (mailroute serve --admin-key)")


def main(argv=None):
    from export.config import ExportConfig
    from mailroute.rerank_policy import GateTarget
    from training.config import TrainConfig

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sweep"]:  # its own parser: the flags after `--` belong to every `mailroute train`
        from training.sweep import main as sweep_main

        sys.exit(sweep_main(argv[1:]))

    ap = argparse.ArgumentParser(prog="mailroute", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the main job on the built-in demo taxonomy: train, export, serve, classify")
    p.add_argument("--run", default=str(DEFAULT_RUN), help=f"run folder (default: {shown(DEFAULT_RUN)})")
    p.add_argument("--repo", default=str(DEFAULT_REPOSITORY), help=REPO_HELP)
    p.add_argument("--retrain", action="store_true", help="train and export again even if a run exists")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("train", help="train bi-encoder + cross-encoder + flat classifier (the baseline, fused into the served answer where validation's held-out likelihood says so: --flat-fusion) and write the evaluation report",
                       description="Dataset: --dataset demo|banking77, or --taxonomy T.json --train A.jsonl --test B.jsonl "
                                   "(format in training/data.py and the README). Invalid data stops training unless --drop-invalid.")
    _add_dataclass_args(p, TrainConfig)
    p.add_argument("--overwrite", action="store_true", help="train over a run folder that already holds a trained run (default: "
                                                            "refused, so that a run is never lost to a forgotten --out)")
    p.set_defaults(fn=cmd_train)

    sub.add_parser("sweep", help="several `mailroute train` configurations at once (e.g. five on one GPU), one summary table; "
                                 "see `mailroute sweep --help`")

    from mailroute import run_layout as layout  # light: file names only

    p = sub.add_parser("taxonomy", help="draft a taxonomy JSON from the labels that example files use (each described by its name), "
                                        "to edit and train with",
                       description="Reads the label column of JSONL or CSV example files (the format of `mailroute train --train`) and "
                                   "writes a taxonomy with every label in order of first appearance, described by its own name in "
                                   "words (card_arrival -> \"card arrival\"). Written descriptions can replace them before training.")
    p.add_argument("examples", nargs="+", help="example files (.jsonl or .csv) whose labels make the taxonomy")
    p.add_argument("--out", required=True, help="taxonomy JSON to write")
    p.add_argument("--name", default="", help="the taxonomy's name (default: the first file's name without its suffix)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (default: refused)")
    p.set_defaults(fn=cmd_taxonomy)

    p = sub.add_parser("refit", help="fit a trained run's rerank policy again on validation (e.g. another gate tolerance), no retraining",
                       description="Scores validation and test again with the run's models, fits fusion, temperature and gate on "
                                   "validation (with the flat classifier's log-probabilities where the run fuses them), and rewrites "
                                   f"{layout.POLICY_FILE} (and {layout.POLICY_WITHOUT_FLAT_FILE}), {layout.METRICS_FILE}, "
                                   f"{layout.PREDICTIONS_FILE} and {layout.REPORT_FILE}; the models are kept.")
    p.add_argument("--run", required=True, help="trained run folder")
    p.add_argument("--gate-tolerance", type=float, default=None,
                   help="validation accuracy the gate may give up versus reranking every email (default: the run's)")
    p.add_argument("--rerank-budget", type=float, default=None,
                   help="share of emails the gate sends through stage 2: up to this share of the least sure, more only where "
                        "validation accuracy needs it (0 = as few as the tolerance allows; default: the run's, "
                        f"{GateTarget.rerank_budget:g} for runs made before the budget existed)")
    _add_device_arg(p)
    p.set_defaults(fn=cmd_refit)

    p = sub.add_parser("resume", help="more cross-encoder epochs for a trained run (stage 1 kept), best epoch on validation, new run folder",
                       description="Keeps the run's bi-encoder and label index, mines the training emails as `train` does, continues the "
                                   "cross-encoder from its weights and keeps its best epoch on validation (the starting weights count "
                                   "as epoch 0), fits the policy on validation and measures test once, in --out.")
    p.add_argument("--run", required=True, help="trained run folder")
    p.add_argument("--out", required=True, help="new run folder")
    from training.config import RESUME_CE_EPOCHS

    p.add_argument("--ce-epochs", type=float, default=RESUME_CE_EPOCHS, help=f"further cross-encoder epochs (default: {RESUME_CE_EPOCHS:g})")
    p.add_argument("--ce-lr", type=float, default=None, help="learning rate (default: the run's)")
    _add_device_arg(p)
    p.set_defaults(fn=cmd_resume)

    p = sub.add_parser("baseline", help="train a run's flat softmax baseline again with more epochs (best on validation); a run that "
                                        "fuses it refits its policy with the new one",
                       description="The flat baseline must get at least the epochs and tuning the two-stage system gets: this trains "
                                   "it again from the base weights on the run's own split, keeps its best epoch on validation, keeps "
                                   f"the model in the run folder ({layout.FLAT_ENCODER_DIR}/, {layout.FLAT_HEAD_FILE}) and replaces its numbers, test "
                                   f"predictions and report rows (the old numbers stay in {layout.METRICS_FILE} under flat_baseline_history). "
                                   "Where the run may fuse the flat classifier into its answer (not --flat-fusion never), the rerank policy is "
                                   "then fitted again with the new one on validation (as `mailroute refit`: both stages scored again; with "
                                   "--flat-fusion auto, fused where validation's held-out likelihood says so); a run trained with "
                                   "--skip-baseline may start fusing it.")
    p.add_argument("--run", required=True, help="evaluated run folder")
    p.add_argument("--flat-epochs", type=int, required=True, help="epochs to train (the best on validation is kept)")
    p.add_argument("--flat-lr", type=float, default=None, help="learning rate (default: the run's)")
    _add_device_arg(p)
    p.set_defaults(fn=cmd_baseline)

    p = sub.add_parser("export", help="export a trained run to ONNX and write new versions into the Triton model repository")
    _add_dataclass_args(p, ExportConfig)
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("serve", help="start the real tritonserver (from nvidia-pytriton) on a model repository")
    p.add_argument("--repo", default=str(DEFAULT_REPOSITORY), help=REPO_HELP)
    p.add_argument("--grpc-port", type=int, default=GRPC_PORT, help=f"0 = a free port (default: {GRPC_PORT})")
    p.add_argument("--http-port", type=int, default=HTTP_PORT, help=f"HTTP/REST port (readiness, repository API); 0 = a free port (default: {HTTP_PORT})")
    p.add_argument("--metrics-port", type=int, default=METRICS_PORT, help=f"Prometheus metrics port; 0 = a free port (default: {METRICS_PORT})")
    p.add_argument("--admin-key", default="", help="require header admin-key=<this> for model load/unload/config (recommended; default: none, so anyone who "
                                                        "can reach the HTTP port can load and unload models)")
    p.add_argument("--poll-all", action="store_true", help="load every model in the repository at start (default: explicit mode, the mailroute models "
                                                           "the repository has). Triton then has no load API: the watchdog restarts the "
                                                           "server instead of reloading a model, and `versions promote --url` cannot load")
    p.add_argument("--log", default=None, help="server log file (default: a temporary file)")
    p.add_argument("--timeout", type=float, default=SERVER_START_TIMEOUT_S, help=f"seconds to wait for readiness (default: {SERVER_START_TIMEOUT_S:g})")
    p.add_argument("--ready-port", type=int, default=READY_PORT,
                   help="port of the proven readiness endpoint /ready (a canary classification; 200 or 503) and /live; "
                        f"its watchdog reloads models whose backend process died (restarts the server where that fails). 0 = a free port, "
                        f"-1 = off: nothing watches the server, and the launcher ends when tritonserver does (default: {READY_PORT})")
    p.add_argument("--canary-interval", type=float, default=CANARY_INTERVAL_S,
                   help=f"seconds between canary classifications (default: {CANARY_INTERVAL_S:g})")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("classify", help="classify emails through a running server",
                       description="Inputs: text arguments, .txt or .eml files, .jsonl files (text or subject+body per line); "
                                   "stdin, read as one email, when none are given (e.g. `mailroute classify < body.txt`; give .eml files by name).")
    p.add_argument("inputs", nargs="*", help="text, or .txt / .eml / .jsonl files")
    p.add_argument("--url", default=DEFAULT_GRPC_URL, help=f"gRPC host:port (default: {DEFAULT_GRPC_URL})")
    p.add_argument("--top-k", type=int, default=None, help="candidates to rerank (default: the served version's own K, the run's "
                                                           "--k-eval unless `mailroute export --top-k` set another; "
                                                           f"{DEFAULTS.top_k} for a version that names none)")
    p.add_argument("--threshold", type=float, default=None, help="needs_review below this probability (default: the served version's own "
                                                                  f"threshold, `mailroute export --threshold`; {DEFAULTS.threshold} unless set)")
    p.add_argument("--timeout", type=float, default=REQUEST_TIMEOUT_S, help=f"seconds per request (default: {REQUEST_TIMEOUT_S:g})")
    p.add_argument("--json", action="store_true", help="one JSON object per email instead of a table")
    p.add_argument("--record", action="store_true", help="record the predictions in the feedback store (prints their ids)")
    _store_args(p, repo=False)
    p.set_defaults(fn=cmd_classify)

    from training.feedback_config import FeedbackConfig

    fb = sub.add_parser("feedback", help="corrections: add, bulk import, status, and train a gated candidate version from them",
                        description="Corrections are stored (SQLite by default, any SQLAlchemy URL) and take effect two ways: as "
                                    "exemplars of their label at once (`train --exemplars-only`), and by continued listwise training "
                                    "of the cross-encoder with replay (`train`). Every candidate passes the promotion gate first.")
    fsub = fb.add_subparsers(dest="action", required=True)
    p = fsub.add_parser("add", help="one correction, by prediction id (from classify --record) or by email text")
    p.add_argument("--prediction", default=None, help="prediction id")
    p.add_argument("--text", default=None, help="the email text (instead of --prediction)")
    p.add_argument("--label", required=True, help="the correct label")
    p.add_argument("--who", default=None, help="who corrected it")
    p.add_argument("--json", action="store_true", help="print the stored correction as JSON")
    _store_args(p)
    p = fsub.add_parser("import", help="bulk import from .jsonl or .csv (prediction_id or text, label[, subject, who]); all or nothing")
    p.add_argument("file", help="corrections file, .jsonl or .csv: prediction_id or text, label[, subject, who] per row")
    p.add_argument("--who", default=None, help="who corrected them (where a row does not say)")
    _store_args(p)
    p = fsub.add_parser("status", help="how many predictions and corrections the store holds")
    _store_args(p, repo=False, writes=False)
    p = fsub.add_parser("train", help="corrections -> candidate version (exemplars + continued training) -> gate [-> promote]")
    _add_dataclass_args(p, FeedbackConfig)
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    for p in fsub.choices.values():
        p.set_defaults(fn=cmd_feedback)

    vp = sub.add_parser("versions", help="classifier versions: list (with gate results), promote, rollback, prune")
    vsub = vp.add_subparsers(dest="action", required=True)
    p = vsub.add_parser("list", help="every classifier version, what it pins, how it was made, its gate result; * = serving")
    p.add_argument("--json", action="store_true", help="one JSON list instead of the table")
    p.add_argument("--repo", default=str(DEFAULT_REPOSITORY), help=REPO_HELP)
    p.set_defaults(fn=cmd_versions)
    p = vsub.add_parser("promote", help="serve a version (loaded into the running server with --url)")
    p.add_argument("version", type=int, help="the classifier version to serve (see `mailroute versions list`)")
    p = vsub.add_parser("rollback", help="serve again the version that served before the current one")
    p.add_argument("--to", type=int, default=None, help="roll back to this version instead")
    p = vsub.add_parser("prune", help="remove old classifier versions and encoder versions no kept classifier pins")
    p.add_argument("--keep", type=int, default=PRUNE_KEEP, help=f"newest classifier versions to keep (the serving one and the last --keep "
                                                                f"rollback targets always stay; default: {PRUNE_KEEP})")
    for name, p in vsub.choices.items():
        if name != "list":
            _server_args(p)
            p.set_defaults(fn=cmd_versions, json=False)

    lp = sub.add_parser("labels", help="add a label at run time: a new classifier version, no retraining")
    lsub = lp.add_subparsers(dest="action", required=True)
    p = lsub.add_parser("add", help="name + description (+ examples) -> a new classifier version; --eval reports zero-shot accuracy")
    p.add_argument("--name", required=True, help="label name (printable, at most 100 characters)")
    p.add_argument("--description", required=True, help="one line saying what emails belong here: the index and the cross-encoder read it")
    p.add_argument("--example", action="append", default=[], help="an example email of the label (repeatable)")
    p.add_argument("--base", type=int, default=0, help="classifier version to start from (default: the serving one)")
    p.add_argument("--eval", default=None, help=".jsonl/.csv of labelled emails (some of the new label): recall and precision on the new "
                                                "label, accuracy before and after (the --example texts are left out of it)")
    p.add_argument("--promote", action="store_true", help="serve the new version")
    _server_args(p)
    p.set_defaults(fn=cmd_labels)

    args = ap.parse_args(argv)
    try:
        if getattr(args, "url", ""):  # every command that talks to a running server: refused before any work
            _check_grpc_url(args.url)
        args.fn(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # known failure kinds get one clear line, not a traceback
        if _known_failure(e):
            if getattr(e, "log_tail", ""):  # a server that died or never got ready: its log's last lines, then the one-line error
                print(f"last lines of the tritonserver log:\n{e.log_tail}", file=sys.stderr)
            sys.exit(f"mailroute {args.command}: {getattr(e, 'summary', e)}")
        raise


# failure kinds of modules the handler does not import: those that need tritonclient, SQLAlchemy, FAISS or the
# ONNX exporter, which a training-only or client-only machine may lack, and the server launcher (a wrong --repo,
# a port in use, no tritonserver installed)
_HEAVY_ERRORS = (("tritonclient.utils", "InferenceServerException"), ("export.versions", "VersionError"),
                 ("mailroute.feedback_store", "FeedbackError"), ("client.server", "ServerStartError"),
                 ("mailroute.label_index", "IndexMismatch"), ("export.onnx_export", "ParityError"))


def _known_failure(e: Exception) -> bool:
    """Whether e is a failure kind the CLI prints as one line. The light kinds are checked first; a heavy
    module's kind only when that module was imported (sys.modules), since an error of a module never loaded
    cannot have been raised: the handler imports nothing, so a missing package cannot mask the user's error."""
    from mailroute.settings import BadSetting, BrokenFile
    from mailroute.taxonomy import DataError

    if isinstance(e, (DataError, BadSetting, BrokenFile, FileNotFoundError, FileExistsError)):
        return True
    kinds = [getattr(sys.modules.get(module), name, None) for module, name in _HEAVY_ERRORS]
    return isinstance(e, tuple(k for k in kinds if isinstance(k, type)))


if __name__ == "__main__":
    main()
