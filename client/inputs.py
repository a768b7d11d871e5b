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


def read_inputs(items: list) -> list:
    out = []
    for n, item in enumerate(items, 1):
        p = Path(item)
        if p.suffix in (".eml", ".txt", ".jsonl") and not p.exists():
            raise InputError(f"{item}: file not found")
        if not p.exists():
            out.append(EmailInput(f"arg {n}", item.encode("utf-8")))
        elif p.suffix == ".eml":
            subject, body = parse_eml(p.read_bytes())
            out.append(EmailInput(str(p), body.encode("utf-8"), subject))
        elif p.suffix == ".jsonl":
            out += read_jsonl(p)
        else:
            out.append(EmailInput(str(p), p.read_bytes()))
    return out


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
        body = obj.get("text", obj.get("body", "")) or ""
        out.append(EmailInput(f"{path}:{n}" + (f" ({obj['id']})" if obj.get("id") else ""), str(body).encode("utf-8"), str(obj.get("subject") or "")))
    return out
