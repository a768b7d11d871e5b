import json
from collections import Counter

import pytest

from mailroute.settings import banking77_dir
from mailroute.taxonomy import DataError, load_taxonomy, parse_taxonomy
from training.data import load_banking77, load_examples, sample_per_label, split_validation

TAX = {"name": "t", "labels": [{"name": "billing_refund", "description": "money back"},
                               {"name": "billing_dispute", "description": "contested charge", "group": "billing"}]}


@pytest.fixture()
def tax():
    return parse_taxonomy(TAX)


def write(tmp_path, name, text, mode="w"):
    p = tmp_path / name
    (p.write_bytes if mode == "wb" else p.write_text)(text)
    return p


def test_demo_dataset_shape(demo):
    labels = demo.taxonomy.names
    assert len(labels) == 50
    assert len({l.group for l in demo.taxonomy.labels}) >= 8
    train, test = Counter(e.label for e in demo.train), Counter(e.label for e in demo.test)
    assert min(train[l] for l in labels) >= 10 and min(test[l] for l in labels) >= 4
    assert not {e.text for e in demo.train} & {e.text for e in demo.test}  # no leak of test emails into train


@pytest.mark.skipif(not banking77_dir().is_dir(), reason=f"BANKING77 is not at {banking77_dir()}: set MAILROUTE_BANKING77 or "
                                                          f"MAILROUTE_SHARED (the dataset is read in place, never part of a clone)")
def test_banking77_loads_in_place():
    d = load_banking77()
    assert len(d.taxonomy) == 77 and len(d.train) == 10003 and len(d.test) == 3080


def test_good_jsonl_and_csv(tmp_path, tax):
    j = write(tmp_path, "a.jsonl", '{"text": "refund me", "label": "billing_refund", "id": "1"}\n'
                                    '{"subject": "Charge", "body": "wrong amount", "label": "billing_dispute"}\n')
    assert [e.text for e in load_examples(j, tax)] == ["refund me", "Charge | wrong amount"]
    c = write(tmp_path, "a.csv", "text,category\nrefund me,billing_refund\n")
    assert load_examples(c, tax)[0].label == "billing_refund"


@pytest.mark.parametrize("content,problem", [
    ('{"text": "hi", "label": "nope"}\n', r"a.jsonl:1: unknown label 'nope'"),
    ('{"text": "ok", "label": "billing_refund"}\n{"text": "  ", "label": "billing_refund"}\n', r"a.jsonl:2: email is empty"),
    ('{"label": "billing_refund"}\n', r"a.jsonl:1: missing column 'text'"),
    ('{"text": "a", "label": "billing_refund", "id": "7"}\n{"text": "b", "label": "billing_refund", "id": "7"}\n', r"a.jsonl:2: duplicate id '7' \(first on line 1\)"),
    ('{"text": "a", "label": ""}\n', r"a.jsonl:1: missing label"),
    ('{"text": "a", "label": "billing_refund"\n', r"a.jsonl:1: invalid JSON"),
    ('["text"]\n', r"a.jsonl:1: expected a JSON object"),
])
def test_jsonl_problems_name_file_line_and_problem(tmp_path, tax, content, problem):
    with pytest.raises(DataError, match=problem):
        load_examples(write(tmp_path, "a.jsonl", content), tax)


def test_bad_encoding_names_the_line(tmp_path, tax):
    p = write(tmp_path, "a.jsonl", b'{"text": "ok", "label": "billing_refund"}\n{"text": "\xff", "label": "billing_refund"}\n', "wb")
    with pytest.raises(DataError, match=r"a.jsonl:2: not UTF-8"):
        load_examples(p, tax)


def test_csv_missing_column(tmp_path, tax):
    with pytest.raises(DataError, match=r"a.csv:1: missing column"):
        load_examples(write(tmp_path, "a.csv", "message,label\nhi,billing_refund\n"), tax)


def test_drop_invalid_keeps_good_rows_and_reports_count(tmp_path, tax, capsys):
    p = write(tmp_path, "a.jsonl", '{"text": "ok", "label": "billing_refund"}\n{"text": "x", "label": "nope"}\n{"text": "", "label": "billing_refund"}\n')
    assert len(load_examples(p, tax, drop_invalid=True)) == 1
    assert "dropped 2 invalid row(s)" in capsys.readouterr().out


@pytest.mark.parametrize("labels,problem", [
    ([{"name": "a", "description": "x"}, {"name": "b", "description": ""}], "label 'b' has no description"),
    ([{"name": "a", "description": "x"}, {"name": "a", "description": "y"}], "duplicate label 'a'"),
    ([{"name": "a", "description": "x"}], "at least 2 labels"),
    ([{"description": "x"}, {"name": "b", "description": "y"}], "missing 'name'"),
])
def test_taxonomy_problems(tmp_path, labels, problem):
    p = write(tmp_path, "t.json", json.dumps({"labels": labels}))
    with pytest.raises(DataError, match=problem):
        load_taxonomy(p)


def test_taxonomy_invalid_json_names_line(tmp_path):
    with pytest.raises(DataError, match=r"t.json:2: invalid JSON"):
        load_taxonomy(write(tmp_path, "t.json", '{"labels": [\n oops]}'))


def test_fingerprint_changes_with_a_description(tax):
    other = parse_taxonomy({"labels": [TAX["labels"][0], {"name": "billing_dispute", "description": "changed"}]})
    assert tax.fingerprint() != other.fingerprint()


def test_validation_split_is_stratified_and_disjoint(demo):
    train, val = split_validation(demo.train, 0.2, seed=1)
    assert len(train) + len(val) == len(demo.train)
    assert set(Counter(e.label for e in val)) == set(demo.taxonomy.names)
    assert not set(map(id, train)) & set(map(id, val))
    assert Counter(e.label for e in sample_per_label(demo.train, 3, 0)).most_common(1)[0][1] == 3


def test_limit_draws_across_labels_not_the_first_rows():
    from training.data import Example, limit

    grouped = [Example(f"email {i}", f"label_{i // 10}") for i in range(100)]  # grouped by label, like BANKING77 test
    sub = limit(grouped, 20, seed=1)
    assert len(sub) == 20 and len({e.label for e in sub}) > 5  # the first 20 rows would hold 2 labels
    assert sub == limit(grouped, 20, seed=1) and [grouped.index(e) for e in sub] == sorted(grouped.index(e) for e in sub)
    assert limit(grouped, 0, seed=1) == grouped and limit(grouped, 500, seed=1) == grouped


@pytest.mark.parametrize("given", [{"taxonomy": "t.json"}, {"train": "train.jsonl", "test": "test.jsonl"}, {"taxonomy": "t.json", "test": "x"}])
def test_half_a_dataset_of_files_is_refused_by_name(given):
    from training.config import TrainConfig
    from training.data import splits_of

    # Given some but not all of --taxonomy/--train/--test (before, --train alone silently trained on the demo data)
    with pytest.raises(DataError, match="given without") as e:
        splits_of(TrainConfig(**given))
    # Then the error names what is missing
    for flag in ("taxonomy", "train", "test"):
        assert f"--{flag}" in str(e.value)


def test_a_taxonomy_drafted_from_example_files_trains_and_names_bad_rows(tmp_path):
    from mailroute.cli import main as cli
    from training.data import load_dataset

    # Given a labelled dataset without a taxonomy (BANKING77's CSV shape: text, category)
    data = tmp_path / "acme"
    data.mkdir()
    (data / "train.csv").write_text("text,category\nwhere is my card,card_arrival\nrefund me,refund-request\nstill no card,card_arrival\n")
    (data / "test.csv").write_text("text,category\nmy card never came,card_arrival\nI want a refund,refund-request\n")
    out = tmp_path / "taxonomy.json"
    # When a taxonomy is drafted from its files
    cli(["taxonomy", str(data / "train.csv"), str(data / "test.csv"), "--out", str(out)])
    # Then every label is there once, in order of first appearance, described by its name in words, named after the folder
    tax = load_taxonomy(out)
    assert [(l.name, l.description) for l in tax.labels] == [("card_arrival", "card arrival"), ("refund-request", "refund request")]
    assert tax.name == "acme"
    # and the dataset loads with it as `mailroute train --taxonomy --train --test` reads it
    ds = load_dataset(out, data / "train.csv", data / "test.csv")
    assert [e.label for e in ds.train] == ["card_arrival", "refund-request", "card_arrival"] and len(ds.test) == 2
    # A JSONL file whose column is named "intent", as other intent datasets name it, reads the same
    (data / "more.jsonl").write_text('{"text": "cancel my order", "intent": "order_cancel"}\n')
    cli(["taxonomy", str(data / "train.csv"), str(data / "more.jsonl"), "--out", str(tmp_path / "more.json")])
    assert load_taxonomy(tmp_path / "more.json").names == ["card_arrival", "refund-request", "order_cancel"]
    assert [e.label for e in load_examples(data / "more.jsonl", load_taxonomy(tmp_path / "more.json"))] == ["order_cancel"]
    # An existing taxonomy is not replaced without --overwrite, and a row without a label is named by file and line
    with pytest.raises(SystemExit, match="taxonomy.json exists"):
        cli(["taxonomy", str(data / "train.csv"), "--out", str(out)])
    with pytest.raises(SystemExit, match="is a folder: --out names the taxonomy JSON file"):
        cli(["taxonomy", str(data / "train.csv"), "--out", str(data), "--overwrite"])
    (data / "bad.csv").write_text("text,category\nwhere is my card,card_arrival\nno label here,\n")
    with pytest.raises(SystemExit, match=r"bad.csv:3: missing label"):
        cli(["taxonomy", str(data / "bad.csv"), "--out", str(tmp_path / "other.json"), "--overwrite"])
    assert load_taxonomy(out).names == ["card_arrival", "refund-request"]
