"""Datasets: the example format, its loaders and their validation.

Examples are JSONL (one object a line) or CSV (a header row), with columns
  text            the email (or use subject + body instead)
  subject, body   optional alternative to text
  label           a label name from the taxonomy ("category" or "intent" are read the same: BANKING77 and other intent
                  datasets name the column so)
  id              optional, unique when given
Every problem is reported as `file:line: problem`. Loading refuses invalid data unless
`drop_invalid=True`, which drops bad rows and reports how many.
"""

import csv
import io
import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from mailroute.normalise import InvalidEmail, normalise
from mailroute.settings import DEFAULTS, banking77_dir
from mailroute.taxonomy import DataError, Taxonomy, load_taxonomy, parse_taxonomy

HERE = Path(__file__).resolve().parent
DEMO_DIR = HERE / "demo"
DEMO_TAXONOMY, DEMO_TRAIN, DEMO_TEST = DEMO_DIR / "taxonomy.json", DEMO_DIR / "train.jsonl", DEMO_DIR / "test.jsonl"
BANKING77_TAXONOMY = HERE / "taxonomies" / "banking77.json"
LABEL_COLUMNS = ("label", "category", "intent")  # the first a row fills is its label


def _label(row: dict) -> str:
    return str(next((row[c] for c in LABEL_COLUMNS if row.get(c)), "")).strip()


@dataclass(frozen=True)
class Example:
    text: str  # normalised: what the encoders see
    label: str
    id: str = ""


@dataclass
class Dataset:
    taxonomy: Taxonomy
    train: list
    test: list


def _rows(path: Path):
    """Yield (line number, dict) from a JSONL or CSV file."""
    try:
        raw = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:  # a folder, no permission
        raise DataError(f"{path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 ({e.reason} at byte {e.start})") from None
    if path.suffix == ".jsonl":
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield n, DataError(f"{path}:{n}: invalid JSON: {e.msg}")
                continue
            yield n, obj if isinstance(obj, dict) else DataError(f"{path}:{n}: expected a JSON object")
    elif path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(raw))
        cols = set(reader.fieldnames or [])
        if not ({"text", "body", "subject"} & cols) or not (set(LABEL_COLUMNS) & cols):
            raise DataError(f"{path}:1: missing column: need 'text' (or 'subject'/'body') and 'label' (or "
                            f"{'/'.join(repr(c) for c in LABEL_COLUMNS[1:])}), found {sorted(cols)}")
        for row in reader:
            yield reader.line_num, row
    else:
        raise DataError(f"{path}: unknown format {path.suffix!r} (use .jsonl or .csv)")


def load_examples(path, taxonomy: Taxonomy, drop_invalid: bool = False) -> list:
    path = Path(path)
    examples, problems, ids = [], [], {}
    for n, row in _rows(path):
        try:
            if isinstance(row, DataError):
                raise row
            label = _label(row)
            if not label:
                raise DataError(f"{path}:{n}: missing label")
            if label not in taxonomy:
                raise DataError(f"{path}:{n}: unknown label {label!r} (not in taxonomy {taxonomy.name!r})")
            body = row.get("text") if row.get("text") is not None else row.get("body")
            if body is None and row.get("subject") is None:
                raise DataError(f"{path}:{n}: missing column 'text' (or 'subject'/'body')")
            try:
                text = normalise(body or "", row.get("subject"))
            except InvalidEmail as e:
                raise DataError(f"{path}:{n}: {e}") from None
            rid = str(row.get("id") or "").strip()
            if rid:
                if rid in ids:
                    raise DataError(f"{path}:{n}: duplicate id {rid!r} (first on line {ids[rid]})")
                ids[rid] = n
            examples.append(Example(text, label, rid))
        except DataError as e:
            if not drop_invalid:
                raise
            problems.append(str(e))
    if problems:
        print(f"{path}: dropped {len(problems)} invalid row(s); first: {problems[0]}")
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def draft_taxonomy(paths: list, name: str = "") -> Taxonomy:
    """A taxonomy of the labels these example files use, in order of first appearance, each described by its own name
    in words ("card_arrival" -> "card arrival"): a start for a labelled dataset that comes without descriptions
    (`mailroute taxonomy`), checked as any taxonomy is. Measured on BANKING77: benchmarks/RESULTS.md, "Label
    descriptions drafted from names"."""
    labels = {}
    for path in map(Path, paths):
        for n, row in _rows(path):
            if isinstance(row, DataError):
                raise row
            label = _label(row)
            if not label:
                raise DataError(f"{path}:{n}: missing label")
            labels.setdefault(label, " ".join(label.replace("_", " ").replace("-", " ").split()))
    first = Path(paths[0])
    name = name or (first.parent.resolve().name if first.stem.lower() in ("train", "test", "dev", "validation") else first.stem)
    return parse_taxonomy({"name": name, "labels": [{"name": k, "description": v} for k, v in labels.items()]},
                          source=", ".join(map(str, paths)))


def load_dataset(taxonomy_path, train_path, test_path, drop_invalid=False) -> Dataset:
    tax = load_taxonomy(taxonomy_path)
    return Dataset(tax, load_examples(train_path, tax, drop_invalid), load_examples(test_path, tax, drop_invalid))


def load_demo() -> Dataset:
    """The built-in 50-label email taxonomy (training/demo/)."""
    return load_dataset(DEMO_TAXONOMY, DEMO_TRAIN, DEMO_TEST)


def load_banking77(folder=None) -> Dataset:
    """BANKING77 read in place; descriptions of its 77 intents live in training/taxonomies/banking77.json."""
    folder = Path(folder or banking77_dir())
    if not (folder / "train.csv").exists():
        raise DataError(f"{folder}: BANKING77 not found (set --banking77 or MAILROUTE_BANKING77)")
    return load_dataset(BANKING77_TAXONOMY, folder / "train.csv", folder / "test.csv")


def load_named(name: str, banking77=None) -> Dataset:
    if name == "demo":
        return load_demo()
    if name == "banking77":
        return load_banking77(banking77)
    raise DataError(f"unknown dataset {name!r}: use 'demo', 'banking77', or --taxonomy/--train/--test files")


def split_validation(examples: list, fraction: float, seed: int) -> tuple:
    """Stratified split of train into (train, validation): every choice is made on validation, never on test."""
    by_label = defaultdict(list)
    for e in examples:
        by_label[e.label].append(e)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_label):
        rows = by_label[label][:]
        rng.shuffle(rows)
        n_val = max(1, round(len(rows) * fraction)) if len(rows) > 1 and fraction > 0 else 0
        val += rows[:n_val]
        train += rows[n_val:]
    return train, val


def stratified_folds(examples: list, folds: int, seed: int) -> list:
    """(n,) fold of each example in 0..folds-1: each label's examples dealt round the folds in a shuffled order, so
    every fold has about 1/folds of every label."""
    by_label = defaultdict(list)
    for i, e in enumerate(examples):
        by_label[e.label].append(i)
    rng = random.Random(seed)
    fold, start = [0] * len(examples), 0
    for label in sorted(by_label):
        rows = by_label[label][:]
        rng.shuffle(rows)
        for j, i in enumerate(rows):
            fold[i] = (start + j) % folds
        start += len(rows)  # labels with fewer emails than folds do not all land in fold 0
    return fold


def limit(examples: list, n: int, seed: int) -> list:
    """At most n examples, drawn at random (fixed seed), kept in their order: datasets are often grouped by
    label (BANKING77's test split is), so the first n would cover only a few labels."""
    if not n or n >= len(examples):
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def sample_per_label(examples: list, n: int, seed: int) -> list:
    """At most n examples of each label (fixed seed): small runs for tests and smoke checks."""
    rng = random.Random(seed)
    rows = examples[:]
    rng.shuffle(rows)
    seen, out = Counter(), []
    for e in rows:
        if seen[e.label] < n:
            seen[e.label] += 1
            out.append(e)
    return out


SPLIT_SETTINGS = ("dataset", "taxonomy", "train", "test", "banking77", "drop_invalid", "seed", "validation_fraction",
                  "sample_per_label", "holdout_fold")  # the TrainConfig fields that decide which emails `splits_of` deals
                                                       # to train, validation and the held-out fold


def splits_of(cfg, held_out: bool = False) -> tuple:
    """(taxonomy, train, validation, test) of a `TrainConfig`: the same emails for every command that reads
    a run (train, refit, resume, baseline, feedback). With --holdout-fold i/n, fold i of the training emails is
    not in train; `held_out=True` gives (taxonomy, that fold, validation, test) instead."""
    files = {"--taxonomy": cfg.taxonomy, "--train": cfg.train, "--test": cfg.test}
    given = [flag for flag, path in files.items() if path]
    if given and len(given) < len(files):  # half a dataset would be read as "." or silently replaced by --dataset's
        missing = [flag for flag in files if flag not in given]
        raise DataError(f"{' and '.join(given)} given without {' and '.join(missing)}: a dataset of your own is the three "
                        f"files together (taxonomy JSON, training and test emails); or leave them all out for --dataset")
    if cfg.taxonomy:
        data = load_dataset(cfg.taxonomy, cfg.train, cfg.test, cfg.drop_invalid)
    else:
        data = load_named(cfg.dataset, cfg.banking77 or None)
    train, val = split_validation(data.train, cfg.validation_fraction, cfg.seed)
    if cfg.sample_per_label:
        train = sample_per_label(train, cfg.sample_per_label, cfg.seed)
    i, n = cfg.holdout()
    if n:
        fold = stratified_folds(train, n, cfg.seed)
        train = [e for e, f in zip(train, fold) if (f == i) == held_out]
    elif held_out:
        raise ValueError("splits_of(held_out=True) needs a run trained with --holdout-fold")
    test = limit(data.test, cfg.test_limit, DEFAULTS.seed)  # one draw for every run, whatever its --seed
    return data.taxonomy, train, val, test
