from pathlib import Path

import pytest

from mailroute.normalise import InvalidEmail, html_to_text, normalise, parse_eml

SAMPLES = Path(__file__).resolve().parent.parent / "training" / "demo" / "samples"


def normalise_eml(raw: bytes) -> str:
    """A raw .eml -> the text the encoders see: the client parses it, the server normalises subject + body."""
    subject, body = parse_eml(raw)
    return normalise(body, subject)


def test_reply_eml_keeps_new_text_and_drops_quote_and_signature():
    text = normalise_eml((SAMPLES / "refund_reply.eml").read_bytes())
    assert text.startswith("Your subscription renewal | Hi,")  # "Re:" stripped from the subject
    assert "refund the renewal payment of €119" in text  # non-ASCII survives
    assert "renewed for another year" not in text  # quoted history gone
    assert "Studio Kappa" not in text and "+351" not in text  # signature gone


def test_html_eml_becomes_text_without_styles_or_quoted_blocks():
    text = normalise_eml((SAMPLES / "login_html.eml").read_bytes())
    assert "temporarily locked" in text
    assert "font-family" not in text and "<" not in text
    assert "Welcome to the service" not in text
    assert "Best regards" not in text


def test_forward_keeps_forwarded_body_but_not_its_headers():
    text = normalise_eml((SAMPLES / "forwarded_damage.eml").read_bytes())
    assert "cracked top" in text
    assert "store14@orbit.example" not in text and "Date:" not in text
    assert "iPhone" not in text


def test_outlook_original_message_and_gt_quotes_are_dropped():
    body = "Please cancel my order.\n\n-----Original Message-----\nFrom: Shop\nSent: Monday\nYour order shipped.\n"
    assert normalise(body) == "Please cancel my order."
    assert normalise("Where is my parcel?\n> old text\n> more old text") == "Where is my parcel?"


def test_wrapped_gmail_reply_marker_is_detected():
    body = "Still not fixed.\n\nOn Mon, 2 Nov 2026 at 10:00, Support Team <support@example.com>\nwrote:\n> Try again"
    assert normalise(body) == "Still not fixed."


def test_signoff_on_first_line_is_content_not_signature():
    assert normalise("Thanks for the quick reply, but the app still crashes.") == "Thanks for the quick reply, but the app still crashes."


def test_whitespace_collapsed_and_subject_joined():
    assert normalise("  hello \n\n\t world  ", subject="Re: RE: Fwd:  Topic ") == "Topic | hello world"


def test_bytes_must_be_utf8():
    with pytest.raises(InvalidEmail, match="not valid UTF-8"):
        normalise(b"\xff\xfe bad")
    assert normalise("caf\u00e9".encode()) == "caf\u00e9"


@pytest.mark.parametrize("body", ["", "   \n\t ", "> only a quote", "<html><body><style>x{}</style></body></html>"])
def test_nothing_left_is_an_error(body):
    with pytest.raises(InvalidEmail, match="empty"):
        normalise(body)


def test_huge_text_is_cut_to_the_character_budget():
    out = normalise("word " * 200_000, max_chars=1000)
    assert len(out) == 1000


def test_html_to_text_breaks_blocks():
    assert html_to_text("<p>a</p><p>b</p>").split() == ["a", "b"]


def test_parse_eml_without_text_part():
    raw = b"Subject: hello\nContent-Type: image/png\n\n\x89PNG"
    assert parse_eml(raw) == ("hello", "")


def test_a_huge_subject_counts_against_the_size_limit():
    from mailroute.settings import DEFAULTS

    half = DEFAULTS.max_request_chars // 2 + 1
    normalise("a" * half)  # the body alone is within the limit
    with pytest.raises(InvalidEmail, match="characters \\(subject and body\\), over the") as e:
        normalise("a" * half, subject="s" * half)
    assert e.value.kind == "too_large"
