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
    """The file, folder or pipe (`<(cmd)`, /dev/stdin) `item` names, or None when it names none. Email text is no
    path: the system refuses a name over 255 bytes (OSError ENAMETOOLONG) or with a NUL (ValueError), and either
    means "text" here."""
    if not item:
        return None  # Path("") is the current folder
    p = Path(item)
    try:
        return p if p.exists() else None
    except (OSError, ValueError):
        return None


def _looks_like_a_path(item: str) -> bool:
    """An item naming no file that is still a mistyped path, not an email: a name ending in .eml/.txt/.jsonl (any
    case) of at most 255 bytes, and either a path with a folder in it or one word ("Re: invoice.txt" is an email)."""
    name = Path(item).name
    return (Path(name).suffix.lower() in FILE_SUFFIXES and len(name.encode("utf-8", "surrogateescape")) <= 255
            and "\n" not in item and ("/" in item or not any(c.isspace() for c in item)))


def read_inputs(items: list) -> list:
    """Each item is a file (.eml, .jsonl, else read as text) when it names an existing file, else email text.
    An item that looks like a mistyped path (see _looks_like_a_path) is refused, not classified as an email."""
    out = []
    for n, item in enumerate(items, 1):
        p = _existing_path(item)
        if p is None:
            if _looks_like_a_path(item):
                raise InputError(f"{item}: file not found")
            out.append(EmailInput(f"arg {n}", item.encode("utf-8", "surrogateescape")))
        elif p.is_dir():
            raise InputError(f"{item}: is a folder; give the files in it")
        else:
            try:
                raw = p.read_bytes()  # once: a pipe can be read only once
            except OSError as e:  # no permission, a device
                raise InputError(f"{item}: cannot read it ({e.strerror})") from None
            suffix = p.suffix.lower()
            if suffix == ".eml":
                subject, body = parse_eml(raw)
                out.append(EmailInput(str(p), body.encode("utf-8"), subject))
            elif suffix == ".jsonl":
                out += read_jsonl(p, raw)
            else:
                out.append(EmailInput(str(p), raw))
    return out


def read_stdin(data) -> list:
    """What was piped in (bytes or str): always one email's text, never a file name."""
    text = data if isinstance(data, bytes) else data.encode("utf-8", "surrogateescape")
    return [EmailInput("stdin", text)] if text.strip() else []


def read_jsonl(path: Path, raw: bytes = None) -> list:
    out = []
    for n, line in enumerate((path.read_bytes() if raw is None else raw).split(b"\n"), 1):
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
