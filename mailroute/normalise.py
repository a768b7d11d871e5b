"""Email normalisation: one function, used by training, the reference classifier and Triton alike.

subject + body (or a raw RFC 822 message) -> one line of plain text: HTML turned into text, quoted
replies, forwarded headers and signatures dropped, whitespace collapsed, cut to a character budget
(the tokenizer then applies the exact token budget). Training and serving must see the same text,
so nothing else in the project may clean email text on its own.
"""

import email
import email.policy
import re
from html.parser import HTMLParser

from mailroute.settings import DEFAULTS


class InvalidEmail(ValueError):
    """The input cannot be classified (not UTF-8, empty after cleaning, too large). `kind` names which,
    for metrics and callers that branch on it."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


_BLOCK_TAGS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "table", "ul", "ol"}
_SKIP_TAGS = {"script", "style", "head", "title"}


class _HTMLText(HTMLParser):
    """HTML -> text with line breaks at block elements; quoted blocks (<blockquote>) marked with '>'."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skip, self.quote = [], 0, 0

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP_TAGS:
            self.skip += 1
        elif tag == "blockquote" or (tag == "div" and ("class", "gmail_quote") in attrs):
            self.quote += 1
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in _SKIP_TAGS:
            self.skip = max(0, self.skip - 1)
        elif tag == "blockquote":
            self.quote = max(0, self.quote - 1)
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.skip:
            return
        if self.quote:  # quoted history: prefix every line so the quote stripper drops it
            data = "\n".join("> " + line for line in data.split("\n"))
        self.parts.append(data)


def html_to_text(html: str) -> str:
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    return "".join(parser.parts)


def looks_like_html(text: str) -> bool:
    return bool(re.search(r"<(html|body|div|p|br|table|span|a)\b[^>]*>", text[:5000], re.I))


# A reply marker ends the new part of a message; everything after it is history.
_REPLY_MARKERS = [
    re.compile(r"^\s*On\b.{0,200}\bwrote:\s*$", re.I | re.S),  # Gmail / Apple Mail ("On Mon, ... wrote:")
    re.compile(r"^\s*-{2,}\s*Original Message\s*-{2,}", re.I),  # Outlook
    re.compile(r"^\s*_{10,}\s*$"),  # Outlook's separator line
    re.compile(r"^\s*Le\b.{0,200}\ba écrit\s*:\s*$", re.I),
    re.compile(r"^\s*Am\b.{0,200}\bschrieb\b.{0,100}:\s*$", re.I),
]
_FORWARD_MARKERS = re.compile(r"^\s*(-{2,}\s*Forwarded message\s*-{2,}|Begin forwarded message:)\s*$", re.I)
_HEADER_LINE = re.compile(r"^\s*(From|To|Cc|Sent|Date|Subject|Reply-To)\s*:", re.I)
_SIGNOFF = re.compile(
    r"^\s*(thanks( a lot| again| in advance)?|thank you( very much)?|many thanks|best( regards| wishes)?|kind regards|"
    r"warm regards|regards|cheers|sincerely( yours)?|all the best|br|thx|ty)\s*[,.!]*\s*([A-Z][\w.'\-]*( [A-Z][\w.'\-]*)?)?\s*$",
    re.I,
)
_MOBILE_FOOTER = re.compile(r"^\s*(Sent from my \w+|Get Outlook for \w+|Sent from (Mail|Yahoo Mail|Outlook) for)", re.I)


def _cut_history(lines: list) -> list:
    """Drop quoted replies; keep a forwarded message's body but not its header block."""
    out, in_fwd_header = [], False
    for i, line in enumerate(lines):
        joined = " ".join(lines[i:i + 2])  # "On ... wrote:" is often wrapped over two lines
        if any(m.match(line) for m in _REPLY_MARKERS) or (_REPLY_MARKERS[0].match(joined) and line.strip().startswith("On ")):
            if any(l.strip() for l in out):
                break
            continue  # a reply marker before any new text: the new text is empty, keep looking
        if _FORWARD_MARKERS.match(line):
            in_fwd_header = True
            continue
        if in_fwd_header:
            if _HEADER_LINE.match(line) or not line.strip():
                continue
            in_fwd_header = False
        if line.lstrip().startswith(">"):
            continue
        out.append(line)
    return out


def _cut_signature(lines: list) -> list:
    """Drop '-- ' signatures, mobile footers and sign-offs ("Thanks, Ana") near the end of the message."""
    for i, line in enumerate(lines):
        if line.rstrip() in ("--", "-- ", "__") or _MOBILE_FOOTER.match(line):
            lines = lines[:i]
            break
    content = [i for i, l in enumerate(lines) if l.strip()]
    for i in content[1:]:  # never the first line: "Thanks for the quick reply" is content
        if _SIGNOFF.match(lines[i]) and len([j for j in content if j > i]) <= 5:
            return lines[:i]
    return lines


def clean_body(body: str) -> str:
    if looks_like_html(body):
        body = html_to_text(body)
    lines = body.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    lines = _cut_signature(_cut_history(lines))
    return " ".join(" ".join(lines).split())


def decode_text(raw, what="text") -> str:
    if isinstance(raw, (bytes, bytearray)):
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidEmail(f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})", "not_utf8") from None
    return str(raw)


def normalise(body, subject=None, max_chars: int = DEFAULTS.max_email_chars) -> str:
    """subject + body -> the text the encoders see. Raises InvalidEmail when nothing is left."""
    body = decode_text(body, "email body")
    subject = decode_text(subject, "subject") if subject is not None else ""
    if len(body) + len(subject) > DEFAULTS.max_request_chars:  # both are cleaned below: both count
        raise InvalidEmail(f"email is {len(body) + len(subject):,} characters{' (subject and body)' if subject else ''}, over the "
                           f"{DEFAULTS.max_request_chars:,} limit", "too_large")
    # cleaning cost grows with length, so cut generously first (quotes and signatures come later in a
    # message, so the new text survives the cut)
    body = clean_body(body[: max_chars * 4])
    subject = " ".join(re.sub(r"^\s*((re|fwd?|aw|tr)\s*:\s*)+", "", subject, flags=re.I).split())
    text = f"{subject} | {body}" if subject and body else (subject or body)
    if not text:
        raise InvalidEmail("email is empty after normalisation (no subject, no body text)", "empty")
    return text[:max_chars]


def parse_eml(raw: bytes) -> tuple:
    """A raw RFC 822 message -> (subject, body text), preferring text/plain over text/html."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    subject = str(msg.get("Subject", "") or "")
    part = msg.get_body(preferencelist=("plain", "html"))
    if part is None:
        return subject, ""
    try:
        body = part.get_content()
    except (LookupError, UnicodeDecodeError):  # unknown or wrong charset: decode leniently
        body = part.get_payload(decode=True).decode("utf-8", errors="replace")
    if part.get_content_subtype() == "html":
        body = html_to_text(body)
    return subject, body
