"""`mailroute classify` inputs: an argument is a file only when it names one, else email text; piped text is always
text. An email is no valid path (a name over 255 bytes, a NUL), which must read as text, never as an OSError."""

import io
import json
from types import SimpleNamespace

import pytest

from client.inputs import InputError, read_inputs, read_stdin
from training.data import DEMO_DIR

EMAIL = ("Hello support team, I was charged twice for my March subscription and would like a refund of the second "
         "payment. My account number is 12345 and the card ends in 9876. ")
LONG = (EMAIL * 20)[:2000]  # one line, no '/': os.stat refuses it with ENAMETOOLONG


def test_a_2000_character_email_argument_is_text():
    assert len(LONG) == 2000 and "/" not in LONG
    [e] = read_inputs([LONG])
    assert (e.source, e.text, e.subject) == ("arg 1", LONG.encode(), "")


def test_a_2000_character_email_on_stdin_is_text():
    piped = "Subject: double charge\n\n" + LONG + "\nSee invoices/2024/march.txt\n"
    for data in (piped, piped.encode()):
        [e] = read_stdin(data)
        assert (e.source, e.text) == ("stdin", piped.encode())
    [e] = read_inputs([piped])  # the same text given as an argument: several lines, ends in .txt, still text
    assert e.text == piped.encode()


@pytest.mark.parametrize("text", ["a/" + "x" * 300 + "/b", "nul \x00 inside", "x" * 5000 + ".txt", "see the report.txt\nthanks"])
def test_text_that_is_no_valid_path_is_text(text):
    assert read_inputs([text])[0].text == text.encode()


def test_real_files_are_still_read(tmp_path):
    txt = tmp_path / "note.txt"
    txt.write_bytes(LONG.encode())
    plain = tmp_path / "no-suffix"
    plain.write_bytes(b"a file without a suffix")
    jl = tmp_path / "in.jsonl"
    jl.write_text(json.dumps({"id": "a", "subject": "Invoice", "body": "Please resend the March invoice"}) + "\n")
    eml = next((DEMO_DIR / "samples").glob("*.eml"))
    out = read_inputs([str(txt), str(plain), str(jl), str(eml), "short text"])
    assert [e.source for e in out] == [str(txt), str(plain), f"{jl}:1 (a)", str(eml), "arg 5"]
    assert out[0].text == LONG.encode() and out[1].text == b"a file without a suffix"
    assert (out[2].subject, out[2].text) == ("Invoice", b"Please resend the March invoice")
    assert out[3].subject and out[3].text  # parsed: subject and body apart
    assert out[4].text == b"short text"


def test_a_mistyped_path_or_a_folder_is_refused(tmp_path):
    with pytest.raises(InputError, match="missing.eml: file not found"):
        read_inputs([str(tmp_path / "missing.eml")])
    with pytest.raises(InputError, match="is a folder"):
        read_inputs([str(tmp_path)])


def test_classify_reads_a_long_piped_email_as_text(monkeypatch, capsys):
    """The CLI end to end up to the client, with a stand-in client (no server)."""
    import client
    from mailroute.cli import main

    seen = {}

    class StandIn:
        def __init__(self, url, **kw):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def classify(self, texts, subjects, **kw):
            seen["texts"] = texts
            return [SimpleNamespace(ok=True, label="billing", probability=0.9, needs_review=False, top_labels=["billing"],
                                    top_probabilities=[0.9])] * len(texts)

    monkeypatch.setattr(client, "ClassifierClient", StandIn)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(LONG.encode())))
    main(["classify", "--url", "127.0.0.1:1"])
    assert seen["texts"] == [LONG.encode()]
    assert "billing" in capsys.readouterr().out  # the CLI prints what the client answered (the stand-in's label)


def test_a_jsonl_line_with_a_lone_surrogate_is_refused_by_line(tmp_path):
    jl = tmp_path / "in.jsonl"
    jl.write_text('{"text": "fine"}\n{"text": "broken \\ud800 here"}\n')
    with pytest.raises(InputError, match=r"in.jsonl:2: text is not encodable as UTF-8"):
        read_inputs([str(jl)])


@pytest.mark.parametrize("item", ["invoice.txt", "report.EML", "out/missing.jsonl", "my folder/mail.eml"])
def test_what_can_only_be_a_mistyped_path_is_refused(item):
    with pytest.raises(InputError, match="file not found"):
        read_inputs([item])


def test_a_sentence_ending_in_a_file_name_is_an_email():
    text = "Hi, I cannot open the attachment invoice.txt"
    assert read_inputs([text])[0].text == text.encode()


def test_a_pipe_and_an_upper_case_suffix_are_read(tmp_path):
    import os

    eml = next((DEMO_DIR / "samples").glob("*.eml"))
    upper = tmp_path / "MAIL.EML"
    upper.write_bytes(eml.read_bytes())
    [e] = read_inputs([str(upper)])
    assert e.subject and not e.text.startswith(b"From:")  # parsed as an .eml, headers apart
    r, w = os.pipe()  # what `mailroute classify <(cmd)` receives: /dev/fd/N
    os.write(w, b"piped email text")
    os.close(w)
    try:
        [e] = read_inputs([f"/dev/fd/{r}"])
    finally:
        os.close(r)
    assert e.text == b"piped email text"


def test_an_unreadable_file_is_named(tmp_path):
    import os

    locked = tmp_path / "locked.txt"
    locked.write_text("secret")
    locked.chmod(0)
    # root reads a mode-0 file; a write-only /proc file refuses every reader
    target = next((p for p in (str(locked), "/proc/sys/vm/compact_memory") if os.path.exists(p) and not _readable(p)), None)
    if target is None:
        pytest.skip("every candidate file is readable by this user (root without a write-only /proc file)")
    with pytest.raises(InputError, match=f"{target}: cannot read it"):
        read_inputs([target])


def _readable(path) -> bool:
    try:
        with open(path, "rb") as f:
            f.read(1)
        return True
    except OSError:
        return False
