"""Reading emails for the CLI: plain text, .txt and .eml files, JSONL (text or subject+body per line)."""

import json
from dataclasses import dataclass
from pathlib import Path

from mailroute.normalise import parse_eml


class InputError(ValueError):
    pass


@dataclass
class EmailInput:
    source: str  # where it came from (file:line or "arg 1")
    text: bytes  # body, raw bytes: the server reports invalid UTF-8 per email
    subject: str = ""


FILE_SUFFIXES = (".eml", ".txt", ".jsonl")


def _existing_path(item: str):
    """The file or folder `item` names, or None when it names none. Email text is no path: the system refuses
    a name over 255 bytes (OSError ENAMETOOLONG) or with a NUL (ValueError), and either means "text" here."""
    if not item:
        return None  # Path("") is the current folder
    p = Path(item)
    try:
        return p if p.is_file() or p.is_dir() else None
    except (OSError, ValueError):
        return None


def read_inputs(items: list) -> list:
    """Each item is a file (.eml, .jsonl, else read as text) when it names an existing file, else email text.
    An item that could be a file name (one line, a name of at most 255 bytes) ending in .eml/.txt/.jsonl but naming
    no file is refused: a mistyped path, not an email."""
    out = []
    for n, item in enumerate(items, 1):
        p = _existing_path(item)
        if p is None:
            name = Path(item).name
            if Path(name).suffix in FILE_SUFFIXES and "\n" not in item and len(name.encode("utf-8", "surrogateescape")) <= 255:
                raise InputError(f"{item}: file not found")
            out.append(EmailInput(f"arg {n}", item.encode("utf-8", "surrogateescape")))
        elif p.is_dir():
            raise InputError(f"{item}: is a folder; give the files in it")
        elif p.suffix == ".eml":
            subject, body = parse_eml(p.read_bytes())
            out.append(EmailInput(str(p), body.encode("utf-8"), subject))
        elif p.suffix == ".jsonl":
            out += read_jsonl(p)
        else:
            out.append(EmailInput(str(p), p.read_bytes()))
    return out


def read_stdin(data) -> list:
    """What was piped in (bytes or str): always one email's text, never a file name."""
    text = data if isinstance(data, bytes) else data.encode("utf-8", "surrogateescape")
    return [EmailInput("stdin", text)] if text.strip() else []


def read_jsonl(path: Path) -> list:
    out = []
    for n, line in enumerate(path.read_bytes().split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{path}:{n}: invalid JSON line ({e})") from None
        if not isinstance(obj, dict) or not ({"text", "body", "subject"} & set(obj)):
            raise InputError(f"{path}:{n}: expected an object with 'text' (or 'subject'/'body')")
        body, subject = str(obj.get("text", obj.get("body", "")) or ""), str(obj.get("subject") or "")
        for field, value in (("text", body), ("subject", subject)):  # JSON may escape a lone surrogate ("\ud800"),
            try:  # which no UTF-8 text can hold
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise InputError(f"{path}:{n}: {field} is not encodable as UTF-8 ({e.reason} at character {e.start})") from None
        raw = body.encode("utf-8")
        out.append(EmailInput(f"{path}:{n}" + (f" ({obj['id']})" if obj.get("id") else ""), raw, subject))
    return out
