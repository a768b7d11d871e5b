"""The feedback, versions and labels commands as a user runs them: answers on stdout, one-line errors."""

import json

import pytest

from mailroute import contract
from mailroute.cli import main
from mailroute.label_index import CARDS_FILE, EXEMPLARS_FILE, INDEX_FILE, MANIFEST_FILE
from mailroute.run_layout import LABEL_INDEX_DIR


def run(capsys, *argv):
    main(list(argv))
    return capsys.readouterr().out


def fails(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return str(e.value)


def test_feedback_commands(repo, tmp_path, capsys, demo):
    db = f"sqlite:///{tmp_path}/fb.sqlite3"
    common = ("--db", db, "--repo", str(repo))
    assert json.loads(run(capsys, "feedback", "status", "--db", db)) == {"predictions": 0, "corrections": 0}
    assert "no usable corrections" in fails(capsys, "feedback", "train", "--db", db, "--repo", str(repo))
    email = demo.test[0]
    out = json.loads(run(capsys, "feedback", "add", "--text", email.text, "--label", email.label, "--who", "me", "--json", *common))
    assert out["label"] == email.label and out["who"] == "me"
    assert "unknown label 'billing_refund_requets'" in fails(capsys, "feedback", "add", "--text", "another", "--label",
                                                             "billing_refund_requets", *common)
    assert "already corrected" in fails(capsys, "feedback", "add", "--text", email.text, "--label", email.label, *common).lower()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine", "label": email.label}) + "\n{broken\n")
    msg = fails(capsys, "feedback", "import", str(bad), *common)
    assert f"{bad}:2:" in msg
    assert json.loads(run(capsys, "feedback", "status", "--db", db))["corrections"] == 1  # the import wrote nothing
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(f"text,label\nrembourser la facture r\xe9gl\xe9e,{email.label}\n".encode("latin-1"))
    assert f"cannot import {latin1}: not UTF-8" in fails(capsys, "feedback", "import", str(latin1), *common)
    for url in ("notaurl", "foo://bar"):  # unparsable; a dialect SQLAlchemy does not know
        assert f"'{url}' is not a usable database URL" in fails(capsys, "feedback", "status", "--db", url)
    assert json.loads(run(capsys, "feedback", "status", "--db", db))["corrections"] == 1


def test_prune_refuses_when_a_kept_version_pins_unknown_encoders(repo, capsys):
    from mailroute.repository import PIPELINE_FILE

    (repo / contract.CLASSIFIER / "1" / PIPELINE_FILE).write_text("{torn")
    before = sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))
    assert "v1 is kept but its pipeline file is unreadable" in fails(capsys, "versions", "prune", "--repo", str(repo))
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == before  # nothing removed


def test_versions_and_labels_commands(repo, capsys):
    rows = json.loads(run(capsys, "versions", "list", "--json", "--repo", str(repo)))
    assert [r["version"] for r in rows] == [1] and rows[0]["serving"]
    assert "nothing to roll back to" in fails(capsys, "versions", "rollback", "--repo", str(repo))
    report = json.loads(run(capsys, "labels", "add", "--name", "pet_insurance", "--description", "insurance for pets", "--repo", str(repo)))
    assert report["version"] == 2 and report["zero_shot"]
    assert "already in the taxonomy" in fails(capsys, "labels", "add", "--name", "pet_insurance", "--description", "x", "--base", "2",
                                              "--repo", str(repo))
    assert "serves" in run(capsys, "versions", "promote", "2", "--repo", str(repo))
    table = run(capsys, "versions", "list", "--repo", str(repo))
    assert "*       2  label" in table and "(* = serving)" in table
    assert "v1 serves" in run(capsys, "versions", "rollback", "--repo", str(repo))


def test_feedback_refuses_what_it_cannot_use_in_one_line(repo, tmp_path, capsys, demo):
    """An unreachable or unopenable store, a --repo without a classifier (corrections could name any label) and a
    folder given as the import file are named errors, and nothing is stored."""
    db = f"sqlite:///{tmp_path}/fb.sqlite3"
    email = demo.test[0]
    msg = fails(capsys, "feedback", "status", "--db", f"sqlite:///{tmp_path}")  # a folder, not a file
    assert f"cannot open the feedback store sqlite:///{tmp_path}: unable to open database file" in msg
    msg = fails(capsys, "feedback", "status", "--db", "postgresql://mailroute:s3cret@127.0.0.1:1/x")
    assert "cannot open the feedback store postgresql+psycopg://mailroute:***@127.0.0.1:1/x" in msg and "s3cret" not in msg
    empty = tmp_path / "no-repo"
    empty.mkdir()
    msg = fails(capsys, "feedback", "add", "--text", email.text, "--label", "no_such_label", "--db", db, "--repo", str(empty))
    assert f"--repo {empty} holds no {contract.CLASSIFIER} version" in msg
    folder = tmp_path / "corrections.jsonl"
    folder.mkdir()
    assert f"cannot import {folder}: Is a directory" in fails(capsys, "feedback", "import", str(folder), "--db", db, "--repo", str(repo))
    assert json.loads(run(capsys, "feedback", "status", "--db", db)) == {"predictions": 0, "corrections": 0}  # nothing stored
    assert "--eval-limit must be >= 0" in fails(capsys, "feedback", "train", "--eval-limit", "-1", "--db", db, "--repo", str(repo))


def test_a_broken_pipeline_file_is_one_line_naming_it(repo, capsys):
    from mailroute.repository import PIPELINE_FILE

    path = repo / contract.CLASSIFIER / "1" / PIPELINE_FILE
    spec = json.loads(path.read_text())
    del spec["cross_encoder_version"]
    path.write_text(json.dumps(spec))
    msg = fails(capsys, "labels", "add", "--name", "pet_insurance", "--description", "insurance for pets", "--repo", str(repo))
    assert f"{path}: {PIPELINE_FILE} pins no cross_encoder_version" in msg


@pytest.mark.parametrize("part, damage, named", [
    (f"{LABEL_INDEX_DIR}/{MANIFEST_FILE}", b'{"encoder": "x", "tax', f"unreadable {MANIFEST_FILE}"),
    (f"{LABEL_INDEX_DIR}/{MANIFEST_FILE}", b'{"taxonomy": "x"}', "not a label index manifest (no encoder)"),
    (f"{LABEL_INDEX_DIR}/{EXEMPLARS_FILE}", b'{"label": "no_such_label", "text": "hi"}\n', "not the exemplar rows save() wrote"),
    (f"{LABEL_INDEX_DIR}/{INDEX_FILE}", b"garbage!", "not a FAISS index"),
    (f"{LABEL_INDEX_DIR}/{CARDS_FILE}", b"[{", f"unreadable {CARDS_FILE}"),
])
def test_a_damaged_file_of_a_version_is_one_line_naming_it(repo, capsys, part, damage, named):
    """Label index files export wrote that no longer read as what they hold (cut off, edited by hand) stop a command
    with one line naming the file, not a traceback; nothing is written. (A damaged flat head: test_flat_fusion.)"""
    path = repo / contract.CLASSIFIER / "1" / part
    assert path.exists(), path
    path.write_bytes(damage)
    before = sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))
    msg = fails(capsys, "labels", "add", "--name", "pet_insurance", "--description", "insurance for pets", "--repo", str(repo))
    assert str(path) in msg and named in msg
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == before


def test_a_hand_edited_label_scoring_out_of_range_is_named(repo, capsys):
    path = repo / contract.CLASSIFIER / "1" / LABEL_INDEX_DIR / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["scoring"] = manifest.get("scoring", {}) | {"description_weight": 2}
    path.write_text(json.dumps(manifest))
    msg = fails(capsys, "labels", "add", "--name", "pet_insurance", "--description", "insurance for pets", "--repo", str(repo))
    assert f"{path}: its scoring does not read" in msg and "description_weight" in msg


def test_a_pipeline_file_with_a_broken_policy_is_named(repo, capsys):
    from mailroute.repository import PIPELINE_FILE

    path = repo / contract.CLASSIFIER / "1" / PIPELINE_FILE
    spec = json.loads(path.read_text())
    spec["policy"]["flat_weight"] = "lots"
    path.write_text(json.dumps(spec))
    msg = fails(capsys, "labels", "add", "--name", "pet_insurance", "--description", "insurance for pets", "--repo", str(repo))
    assert f"{path}: its policy is not a rerank policy: RerankPolicy.flat_weight must be a number, got 'lots'" in msg


def test_label_examples_are_normalised_like_every_email(repo, capsys):
    """An --example is indexed and shown on the label card as the encoders see emails (HTML and spacing cleaned)."""
    from mailroute.normalise import normalise
    from mailroute.repository import load_label_index, version_dir

    raw = "<p>My   <b>dog</b> broke a leg:\n\n\n is the vet covered?</p>"
    run(capsys, "labels", "add", "--name", "pet_insurance", "--description", "insurance for pets", "--example", raw, "--repo", str(repo))
    index = load_label_index(repo, version_dir(repo, contract.CLASSIFIER, 2))
    assert normalise(raw) != raw and index.exemplar_texts[-1] == normalise(raw)
    assert "--example 1: " in fails(capsys, "labels", "add", "--name", "pet_food", "--description", "food for pets", "--example", "   ",
                                    "--repo", str(repo))


def test_the_demo_exports_unless_what_serves_comes_from_its_run(tiny_repo, tiny_run, tmp_path):
    """`mailroute demo` skips its export only where the serving version was exported from the run it shows."""
    from pathlib import Path

    from mailroute.cli import _served_run

    assert _served_run(tiny_repo) == Path(tiny_run).resolve()
    assert _served_run(tmp_path) is None  # no classifier: export


def test_versions_name_a_broken_file_and_skip_a_torn_last_promotion(repo, capsys):
    from export.versions import history
    from mailroute.repository import CONFIG_FILE, GATE_REPORT_FILE, HISTORY_FILE

    run(capsys, "labels", "add", "--name", "pet_insurance", "--description", "insurance for pets", "--repo", str(repo))
    run(capsys, "versions", "promote", "2", "--repo", str(repo))
    log = repo / contract.CLASSIFIER / HISTORY_FILE
    whole = history(repo)
    with open(log, "a") as f:
        f.write('{"at": "2026-11-28T14:00:00Z", "action": "prom')  # a crash while appending
    assert history(repo) == whole  # the torn record is left out
    assert "v1 serves" in run(capsys, "versions", "rollback", "--repo", str(repo))
    after = history(repo)  # the next record starts a line of its own: not glued to the torn one, not lost
    assert after[:-1] == whole and after[-1]["action"] == "rollback" and after[-1]["version"] == 1
    log.write_text("{torn\n" + log.read_text())
    assert f"{log}:1: not a promotion record" in fails(capsys, "versions", "rollback", "--repo", str(repo))
    (repo / contract.CLASSIFIER / "2" / GATE_REPORT_FILE).write_text("{cut")
    rows = json.loads(run(capsys, "versions", "list", "--json", "--repo", str(repo)))
    assert f"unreadable {GATE_REPORT_FILE}" in rows[1]["error"] and "error" not in rows[0]
    config = repo / contract.CLASSIFIER / CONFIG_FILE
    config.write_text("version_policy { specific")
    assert f"{config} is not a Triton model configuration" in fails(capsys, "versions", "list", "--repo", str(repo))
