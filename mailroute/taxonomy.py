"""The label taxonomy: names, one-line descriptions, optional groups.

File format (JSON): {"name": "...", "labels": [{"name": "billing_refund", "description": "...",
"group": "billing"}, ...]}. A label name is printable text of at most 100 characters (NAME_RE). The bi-encoder sees a
label as `Label.text()` (its name with underscores as spaces, then its description) and the cross-encoder its label
card (`CardSpec`: that text plus a few emails of the label), the same in training, in the label index and in serving.
"""

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

NAME_RE = re.compile(r"^[^\s\x00-\x1f][^\x00-\x1f]{0,99}$")  # printable, at most 100 characters


@dataclass(frozen=True)
class CardSpec:
    """The label card's format: what the cross-encoder reads on the label side (the description plus this many
    emails of the label, within a character budget). Saved in the index manifest, so labels added to a
    version later get cards of the same format.

    nearest: the emails shown are the label's exemplars nearest to the email being classified (by the
    bi-encoder, `LabelIndex.pair_cards`), so the reranker reads the evidence retrieval used, word for word;
    otherwise the label's most typical emails, one fixed card per label. On BANKING77 (40 training emails
    per label, one epoch; benchmarks/neighbour_cards.py) nearest cards lifted the cross-encoder alone from
    77% to 90% on validation at the same pair length."""
    examples: int = 2  # emails shown (0 = the description only)
    chars: int = 240  # the whole card's length
    example_chars: int = 100  # each example's
    nearest: bool = False  # the label's exemplars nearest to the email instead of its most typical emails

    def __post_init__(self):
        if self.examples < 0 or self.chars < 1 or self.example_chars < 1:
            raise DataError(f"a label card needs examples >= 0 and positive character budgets, got {self}")
        if self.nearest and not self.examples:
            raise DataError(f"label cards of the nearest exemplars need examples >= 1, got {self}")

    def text(self, description: str, examples: list) -> str:
        return "".join(self.segments(description, examples))

    def segments(self, description: str, examples: list) -> list:
        """The card as consecutive pieces (joined: `text`): the description, " Examples: ", each example and
        the " | " between them, cut to the card's length. Every piece meets the next at a space, so a
        tokenizer that splits words at whitespace tokenises the card as the pieces' tokens end to end; the
        serving pipeline tokenises each example once this way (`pipeline.CardTokens`)."""
        shown = [e[:self.example_chars] for e in list(examples)[:self.examples]]
        pieces = [description]
        if " | ".join(shown):
            pieces.append(" Examples: ")
            for i, e in enumerate(shown):
                pieces += [" | ", e] if i else [e]
        out, room = [], self.chars
        for piece in pieces:
            if room <= 0:
                break
            out.append(piece[:room])
            room -= len(out[-1])
        return [p for p in out if p]


class DataError(ValueError):
    """Invalid taxonomy or dataset; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class Label:
    name: str
    description: str
    group: str = ""

    def text(self) -> str:
        return f"{self.name.replace('_', ' ')}: {self.description}"


@dataclass(frozen=True)
class Taxonomy:
    labels: tuple
    name: str = "taxonomy"

    def __post_init__(self):
        object.__setattr__(self, "_index", {l.name: i for i, l in enumerate(self.labels)})

    @property
    def names(self) -> list:
        return [l.name for l in self.labels]

    @property
    def texts(self) -> list:
        return [l.text() for l in self.labels]

    def __len__(self):
        return len(self.labels)

    def __contains__(self, name):
        return name in self._index

    def index(self, name: str) -> int:
        if name not in self._index:
            raise DataError(f"unknown label {name!r} (not in taxonomy {self.name!r})")
        return self._index[name]

    def to_json(self) -> dict:
        return {"name": self.name, "labels": [asdict(l) for l in self.labels]}

    def fingerprint(self) -> str:
        """Changes whenever a label or its text changes: the label index records it."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def parse_taxonomy(obj, source="taxonomy") -> Taxonomy:
    if not isinstance(obj, dict) or not isinstance(obj.get("labels"), list):
        raise DataError(f"{source}: expected an object with a 'labels' list")
    labels, seen = [], set()
    for i, row in enumerate(obj["labels"], 1):
        where = f"{source}: label #{i}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with name and description, got {type(row).__name__}")
        name = str(row.get("name", "")).strip()
        if not name:
            raise DataError(f"{where}: missing 'name'")
        if not NAME_RE.match(name):
            raise DataError(f"{where}: label name {name!r} must be printable text of at most 100 characters")
        if name in seen:
            raise DataError(f"{where}: duplicate label {name!r}")
        desc = str(row.get("description") or "").strip()
        if not desc:
            raise DataError(f"{where}: label {name!r} has no description")
        seen.add(name)
        labels.append(Label(name, " ".join(desc.split()), str(row.get("group") or "").strip()))
    if len(labels) < 2:
        raise DataError(f"{source}: a taxonomy needs at least 2 labels, got {len(labels)}")
    return Taxonomy(tuple(labels), str(obj.get("name") or Path(str(source)).stem))


def load_taxonomy(path) -> Taxonomy:
    path = Path(path)
    try:
        raw = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: taxonomy file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    return parse_taxonomy(obj, str(path))
