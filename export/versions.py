"""Versions in the Triton model repository: written atomically, listed, promoted into the running
server, rolled back, pruned.

Which `email_classifier` version serves is its config's version policy (`specific { versions: [v] }`),
so a server that restarts serves the same version it served before. Every change of it is appended to
`email_classifier/promotions.jsonl`; `rollback` serves the version that served before the current one.

Behaviour of tritonserver 2.51 this relies on (measured here; tests/test_versions_triton.py checks it):
  - a folder inside a model folder whose name is not a number is ignored, so a version is built in
    `.staging-<v>-<pid>` and renamed into place only when complete: a crash leaves no half version;
  - `load` of a model whose config names another version loads that version, then swaps: requests in
    flight and arriving during the swap are answered (0 failures under concurrent load);
  - when that version fails to load, `load` answers INVALID_ARGUMENT and the old version keeps serving;
    the config on disk is then put back, so a restart serves the old version too.
"""

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from mailroute import contract
from mailroute.label_index import MANIFEST_FILE
from mailroute.settings import PRUNE_KEEP, BrokenFile, read_json
from mailroute.repository import (CONFIG_FILE, GATE_REPORT_FILE, HISTORY_FILE, LABEL_INDEX_DIR, PIPELINE_FILE,  # noqa: F401
                                  encoder_models, encoders_in_classifier, read_model_config, read_pipeline,
                                  served_encoder_models, utc_stamp, versions)

STAGING_PREFIX = ".staging-"


class VersionError(RuntimeError):
    """A version operation that cannot be done (unknown version, nothing to roll back to, failed load)."""


class PromotionFailed(VersionError):
    """The server refused to load the new version; the old one is still serving."""


@contextmanager
def new_version(repo, model: str, version: int = 0):
    """Yield (folder to fill, version number); the folder becomes <repo>/<model>/<v> only when the block
    ends without an exception, by one rename. A failed block leaves nothing behind."""
    root = Path(repo) / model
    root.mkdir(parents=True, exist_ok=True)
    v = version or max(versions(repo, model), default=0) + 1
    final = root / str(v)
    if final.exists():
        raise FileExistsError(f"{final} exists: versions are immutable, pick another version")
    staging = root / f"{STAGING_PREFIX}{v}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging, v
        os.rename(staging, final)  # atomic on one file system; fails if another writer took v first
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_stale_staging(repo) -> list:
    """Staging folders left by a crashed writer (their process is gone) -> removed, listed."""
    gone = []
    for p in Path(repo).glob(f"*/{STAGING_PREFIX}*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(p, ignore_errors=True)
            gone.append(str(p))
    return gone


# the serving version: the classifier config's version policy

def write_config(repo, cfg: model_config_pb2.ModelConfig, model: str = contract.CLASSIFIER) -> None:
    path = Path(repo) / model / CONFIG_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text_format.MessageToString(cfg))
    os.replace(tmp, path)  # a reader sees the old config or the new one, never half of one


def serving_version(repo):
    """The classifier version the config serves (None when the config serves the latest, as old repositories did)."""
    if not (Path(repo) / contract.CLASSIFIER / CONFIG_FILE).exists():
        raise VersionError(f"{repo} holds no {contract.CLASSIFIER} (no {CONFIG_FILE}): run `mailroute export` first")
    cfg = read_model_config(repo)
    return int(cfg.version_policy.specific.versions[0]) if cfg.version_policy.HasField("specific") else None


def set_serving(repo, version: int) -> None:
    cfg = read_model_config(repo)
    cfg.version_policy.Clear()
    cfg.version_policy.specific.versions.append(int(version))
    write_config(repo, cfg)


def history(repo) -> list:
    """The promotion log, oldest first. A last line cut off (a crash while appending) is left out: that change was
    never recorded whole; a bad line before it is a BrokenFile."""
    path = Path(repo) / contract.CLASSIFIER / HISTORY_FILE
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()] if path.exists() else []
    out = []
    for i, (n, line) in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i < len(lines) - 1:
                raise BrokenFile(f"{path}:{n}: not a promotion record ({e})") from None
    return out


def _log(repo, entry: dict) -> None:
    path = Path(repo) / contract.CLASSIFIER / HISTORY_FILE
    raw = path.read_bytes() if path.exists() else b""
    if raw and not raw.endswith(b"\n"):  # a torn last record (history() leaves it out): cut it, or this one would join it
        with open(path, "r+b") as f:
            f.truncate(raw.rfind(b"\n") + 1)
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def _load(url: str, model: str, admin_key: str = "") -> None:
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(url)
    try:
        c.load_model(model, headers={contract.ADMIN_HEADER: admin_key} if admin_key else None)
    finally:
        c.close()


def promote(repo, version: int, url: str = None, admin_key: str = "", action: str = "promote", note: str = "") -> dict:
    """Serve classifier `version`: the config names it, and (url given) the running server loads it and its
    pinned encoder versions. If the server cannot load it, the old config is put back and PromotionFailed
    raised: the old version keeps serving."""
    repo = Path(repo)
    if int(version) not in versions(repo, contract.CLASSIFIER):
        raise VersionError(f"{contract.CLASSIFIER} has no version {version} in {repo} (has {versions(repo, contract.CLASSIFIER)})")
    old_cfg, old = read_model_config(repo), current_version(repo)
    set_serving(repo, version)
    t = time.perf_counter()
    if url:
        try:
            for model in served_encoder_models(repo):  # `all` policy: a load picks up new encoder versions
                _load(url, model, admin_key)
            _load(url, contract.CLASSIFIER, admin_key)
        except Exception as e:
            write_config(repo, old_cfg)
            raise PromotionFailed(f"server at {url} could not load {contract.CLASSIFIER} {version}; "
                                  f"version {old} is still serving: {getattr(e, 'message', lambda: str(e))()}") from None
    entry = {"at": utc_stamp(), "action": action, "version": int(version),
             "previous": old if old != int(version) else None,
             "loaded_in_s": round(time.perf_counter() - t, 3) if url else None, "note": note}
    _log(repo, entry)
    return entry


def served_stack(repo) -> list:
    """The promotion history replayed as a stack: a promotion pushes its version, a rollback pops the
    current one (and pushes its target when that was not the one below). The top serves; the one below
    it is where `rollback` goes. Versions no longer on disk are skipped."""
    stack = []
    for h in history(repo):
        if not stack and h.get("previous") not in (None, h["version"]):
            stack.append(h["previous"])  # what served before the history began (a repository from before it)
        if h["action"] == "rollback" and stack:
            stack.pop()
        if not stack or stack[-1] != h["version"]:
            stack.append(h["version"])
    on_disk = set(versions(repo, contract.CLASSIFIER))
    return [v for v in stack if v in on_disk]


def rollback(repo, url: str = None, admin_key: str = "", to: int = None) -> dict:
    """Serve again the version that served before the current one (or `to`); a second rollback goes one further back."""
    current = current_version(repo)
    if to is None:
        below = [v for v in served_stack(repo) if v != current]
        if not below:
            raise VersionError(f"nothing to roll back to: no version served before {contract.CLASSIFIER} {current} is on disk")
        to = below[-1]
    return promote(repo, to, url, admin_key, action="rollback")


def current_version(repo) -> int:
    """The version serving now: the one the config names, else (a `latest` policy) the newest."""
    named = serving_version(repo)
    if named is not None:
        return named
    vs = versions(repo, contract.CLASSIFIER)
    if not vs:
        raise VersionError(f"{repo} holds no {contract.CLASSIFIER} version: run `mailroute export` first")
    return vs[-1]


def list_versions(repo) -> list:
    """One row per classifier version: what it pins, how it was made, its gate result, whether it serves."""
    repo = Path(repo)
    serving = serving_version(repo)
    rows = []
    for v in versions(repo, contract.CLASSIFIER):
        vdir = repo / contract.CLASSIFIER / str(v)
        try:
            spec = read_pipeline(vdir)
        except (OSError, ValueError) as e:
            rows.append({"version": v, "error": f"unreadable {PIPELINE_FILE}: {e}"})
            continue
        try:
            gate = _json(vdir / GATE_REPORT_FILE, None)
            manifest = _json(vdir / LABEL_INDEX_DIR / MANIFEST_FILE, {})
        except BrokenFile as e:
            rows.append({"version": v, "error": str(e)})
            continue
        rows.append({"version": v, "serving": v == serving or (serving is None and v == max(versions(repo, contract.CLASSIFIER))),
                     "kind": spec.kind, "parent": spec.parent, "created": spec.created,
                     contract.BI_ENCODER: spec.bi_encoder_version, contract.CROSS_ENCODER: spec.cross_encoder_version,
                     contract.FLAT_ENCODER: spec.flat_encoder_version,
                     "labels": manifest.get("labels"), "exemplars": manifest.get("exemplars"), "gate": gate})
    return rows


def _json(path: Path, missing):
    """A JSON file a version holds (`missing` where it has none); BrokenFile naming it when cut off."""
    return read_json(path) if path.exists() else missing


def _pct(x) -> str:
    return "-" if x is None else f"{x:.2%}"


def format_gate(g: dict) -> str:
    c, s = g["candidate"], g["serving"]
    return (f"{'passed' if g['passed'] else 'FAILED (' + g.get('why', '') + ')'}: evaluation {_pct(c['evaluation_accuracy'])} "
            f"(serving {_pct(s['evaluation_accuracy'])}), {g['held_out_corrections']} held-out corrections "
            f"{_pct(c['corrections_accuracy'])} (serving {_pct(s['corrections_accuracy'])})")


def format_versions(rows: list) -> str:
    head = f"{'':2}{'version':>7}  {'kind':<12}{'parent':>6}  {'bi':>3} {'cross':>5} {'flat':>4}  {'labels':>6} {'exemplars':>9}  gate"
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"  {r['version']:>7}  {r['error']}")
            continue
        g = r["gate"]
        gate = "-" if not g else format_gate(g)
        lines.append(f"{'*' if r['serving'] else ' ':2}{r['version']:>7}  {r['kind']:<12}{r['parent'] or '-':>6}  {r[contract.BI_ENCODER]:>3} "
                     f"{r[contract.CROSS_ENCODER]:>5} {r.get(contract.FLAT_ENCODER) or '-':>4}  {r['labels'] or '-':>6} {r['exemplars'] if r['exemplars'] is not None else '-':>9}  {gate}")
    return "\n".join(lines) + "\n(* = serving)"


def prune(repo, keep: int = PRUNE_KEEP, url: str = None, admin_key: str = "") -> dict:
    """Remove classifier versions beyond the newest `keep`, except the serving one and the last `keep`
    rollback targets, then every encoder version no remaining classifier version pins, and staging folders
    of crashed writers. Everything is planned before anything is removed; a kept version whose pipeline cannot
    be read stops the prune before anything is removed (the encoders it pins are unknown). The server (url given)
    reloads the encoders to let removed versions go."""
    repo = Path(repo)
    if keep < 1:
        raise VersionError(f"prune keeps at least 1 classifier version, got keep={keep}")
    cvs = versions(repo, contract.CLASSIFIER)
    serving = serving_version(repo) or (cvs[-1] if cvs else None)
    protected = set(cvs[-keep:]) | {serving} | set(served_stack(repo)[-(keep + 1):])
    plan = {contract.CLASSIFIER: [v for v in cvs if v not in protected]}
    pinned = {m: set() for m in encoder_models(repo)}
    for v in cvs:
        if v in plan[contract.CLASSIFIER]:
            continue
        try:
            for model, pin in read_pipeline(repo / contract.CLASSIFIER / str(v)).pins().items():
                pinned.setdefault(model, set()).add(pin)
        except (OSError, ValueError, KeyError) as e:  # its encoders are unknown: removing any could break a kept version
            raise VersionError(f"prune: {contract.CLASSIFIER} v{v} is kept but its pipeline file is unreadable ({e}), so the "
                               f"encoder versions it pins are unknown; nothing removed. Repair or remove v{v} first") from None
    for model, keep_set in pinned.items():
        plan[model] = [v for v in versions(repo, model) if v not in keep_set]
    for model, vs in plan.items():
        for v in vs:
            shutil.rmtree(repo / model / str(v))
    plan["staging"] = remove_stale_staging(repo)
    if url:
        try:
            for model in served_encoder_models(repo):  # a server of the classifier alone was never given them
                if plan.get(model):
                    _load(url, model, admin_key)
        except Exception as e:  # the files are gone already: say so, and how the server lets them go
            removed = ", ".join(f"{m} {vs}" for m, vs in plan.items() if vs and m != "staging")
            raise VersionError(f"prune removed {removed} from {repo}, but the server at {url} did not reload "
                               f"({getattr(e, 'message', lambda: str(e))()}); it keeps them loaded until a reload "
                               f"(`mailroute versions promote N --url ...`) or a restart") from None
    return plan
