"""Label cards of the nearest exemplars (CardSpec.nearest): the label side of each (email, label) pair shows that
label's training emails nearest to the email, the same in the index, in training rows, in the pipeline that serves
and in a whole `mailroute train` run."""

import json
from dataclasses import asdict, replace

import numpy as np
import pytest

from mailroute.label_index import CardSpec, LabelIndex, LabelScoring
from mailroute.repository import open_onnx_classifier
from mailroute.taxonomy import DataError, Label, Taxonomy

NEAREST = CardSpec(examples=2, chars=400, example_chars=50, nearest=True)


def _index(spec: CardSpec = NEAREST) -> LabelIndex:
    """3 labels in 3 dimensions: label a has exemplars along x at three angles, b along y, c has none."""
    tax = Taxonomy((Label("a", "alpha"), Label("b", "beta"), Label("c", "gamma")), "t")
    ex = np.array([[1, 0, 0], [0.8, 0.6, 0], [0.6, 0, 0.8], [0, 1, 0], [0.6, 0.8, 0]], np.float32)
    return LabelIndex.build(tax, np.eye(3, dtype=np.float32), "enc", ex, [0, 0, 0, 1, 1], ["a-x", "a-xy", "a-xz", "b-y", "b-yx"],
                            LabelScoring(1, 0.0), cards=["a fixed", "b fixed", "c fixed"], card_spec=spec)


def test_cards_show_each_labels_exemplars_nearest_the_email_best_first():
    index = _index()
    xq = np.array([[0.7, 0.7, 0], [0.7, 0, 0.7]], np.float32)
    cards = index.pair_cards(xq, [np.array([0, 1, 2]), np.array([0])])
    # email 0 is nearest a-xy then a-x among a's; b-yx then b-y among b's; c has no exemplars: its label text alone
    assert cards[0] == "a: alpha Examples: a-xy | a-x" and cards[1] == "b: beta Examples: b-yx | b-y" and cards[2] == "c: gamma"
    assert cards[3] == "a: alpha Examples: a-xz | a-x"  # another email, other neighbours: the card depends on the email
    # an email never sees itself: its own exemplar row is left out (training mines leave-one-out)
    assert index.pair_cards(xq[:1], [np.array([0])], exclude=np.array([1])) == ["a: alpha Examples: a-x | a-xz"]
    # fixed cards are the same for every email
    fixed = _index(CardSpec(examples=2))
    assert fixed.pair_cards(xq, [np.array([0, 1]), np.array([2])]) == ["a fixed", "b fixed", "c fixed"]


def test_nearest_format_survives_save_load_and_the_torch_search(tmp_path):
    index = _index()
    index.save(tmp_path / "ix")
    again = LabelIndex.load(tmp_path / "ix")
    assert again.card_spec == NEAREST
    xq = np.array([[0.7, 0.7, 0]], np.float32)
    want = index.pair_cards(xq, [np.array([0, 1])])
    assert again.pair_cards(xq, [np.array([0, 1])]) == want
    assert again.on_device("cpu").pair_cards(xq, [np.array([0, 1])]) == want  # the torch runtime's index reads the same cards
    with pytest.raises(DataError, match="nearest"):
        CardSpec(examples=0, nearest=True)


def test_listwise_rows_read_the_cards_serving_reads(demo):
    from training.mining import listwise_rows

    index = _index()
    ex = type(demo.train[0])
    emails = [ex("first", "a"), ex("second", "c")]
    x = np.array([[0.7, 0.7, 0], [0.7, 0, 0.7]], np.float32)
    cand = np.array([[1, 2], [0, 1]])  # the first email's gold (a) was not retrieved: it replaces the weakest candidate
    rows = listwise_rows(emails, cand, index, seed=0, x=x, exclude=np.array([1, -1]))
    assert rows["docs"][0][rows["labels"][0].index(1)] == "a: alpha Examples: a-x | a-xz"  # not a-xy: that is the email itself
    assert sorted(rows["docs"][1]) == sorted(index.pair_cards(x[1:], [np.array([0, 2])]))
    with pytest.raises(ValueError, match="embeddings"):
        listwise_rows(emails, cand, index, seed=0)


def test_pipeline_pairs_carry_each_emails_nearest_cards(tiny_repo):
    """Stage 2 with nearest cards: the cross-encoder's tensors equal encode_batch on (email, that email's card) pairs,
    whether _score embeds the emails itself or score_candidates hands it stage 1's embeddings."""
    from mailroute.pipeline import tensors

    clf = open_onnx_classifier(tiny_repo)
    clf.index = replace(clf.index, manifest=clf.index.manifest | {"cards": asdict(replace(clf.index.card_spec, nearest=True))})
    emails = ["Refund?", "I was charged twice for one order, please refund the second payment.", "Where is my parcel?"]
    cand = [np.array([0, 1, 2]), np.array([1, 3]), np.array([4, 0])]
    seen = []

    class Recorder:
        def __init__(self, encoders):
            self.inner = encoders

        def embed(self, ids, mask):
            return self.inner.embed(ids, mask)

        def flat_embed(self, ids, mask):
            return self.inner.flat_embed(ids, mask)

        def score(self, ids, mask, types):
            seen.append((ids, mask, types))
            return np.zeros(len(ids), np.float32)

    clf.encoders, clf.score_batch = Recorder(clf.encoders), 4
    clf._card_tokens().unchecked = 0  # the cards' tokens come from their pieces alone, unchecked
    clf._score(emails, cand)
    assert clf._card_tokens().by_pieces
    cards = clf.index.pair_cards(clf.embed(emails), cand)
    assert len(set(cards)) > 1 and all("Examples: " in c for c in cards)
    pairs = [(e, card) for e, card in zip(np.repeat(emails, [len(c) for c in cand]), cards)]
    assert len(seen) == -(-len(pairs) // 4)  # every chunk of 4 pairs was scored, and each is checked below
    for s, (ids, mask, types) in zip(range(0, len(pairs), 4), seen):
        for got, ref in zip((ids, mask, types), tensors(clf.cross_tok.encode_batch(pairs[s:s + 4]))):
            assert got.shape == ref.shape and (got == ref).all()
    # the served path: same pairs from stage 1's own embeddings
    seen.clear()
    rows, _ = clf.score_candidates(emails, [3, 3, 3])
    served = clf.index.pair_cards(clf.embed(emails), [r[0] for r in rows])
    flat = [(e, card) for e, card in zip(np.repeat(emails, 3), served)]
    assert len(seen) == 3
    for s, (ids, mask, types) in zip(range(0, len(flat), 4), seen):
        for got, ref in zip((ids, mask, types), tensors(clf.cross_tok.encode_batch(flat[s:s + 4]))):
            assert got.shape == ref.shape and (got == ref).all()


def test_train_with_nearest_cards_end_to_end(tmp_path):
    """`mailroute train --card-nearest` on the demo taxonomy with a tiny random base: the run's index keeps the
    format, the reported numbers are the saved predictions', and the exported classifier answers as the run's
    reference does (that training and serving build the same nearest cards: the tests above)."""
    from mailroute.run_layout import RunFolder
    from training.config import TrainConfig
    from training.data import splits_of
    from tiny_encoders import make_tiny_base
    from training.run import run

    base = make_tiny_base(tmp_path / "base")
    m = run(TrainConfig(dataset="demo", out=str(tmp_path / "run"), base=str(base), card_nearest=True, bi_epochs=0.2, ce_epochs=0.2,
                        skip_baseline=True, test_limit=40, k_train=3, k_eval=3))
    out = RunFolder(tmp_path / "run")
    cfg = json.loads(out.config.read_text())
    assert cfg["card_nearest"] is True
    # the reported numbers are those of the saved test predictions, one per test email of the run's split, in order
    test = splits_of(TrainConfig(**cfg))[3]
    rows = [json.loads(line) for line in out.predictions.read_text().splitlines() if line.strip()]
    assert m["n_test"] == len(test) == 40 and [r["gold"] for r in rows] == [e.label for e in test]
    assert m["two_stage"]["accuracy"] == pytest.approx(np.mean([r["label"] == r["gold"] for r in rows]))
    assert m["two_stage"]["share_reranked"] == pytest.approx(np.mean([r["reranked"] for r in rows]))
    assert LabelIndex.load(out.label_index).card_spec.nearest
    # exported, the served classifier keeps the format and answers as the run's PyTorch reference does
    from export.run import ExportConfig, export
    from training.reference import load_reference

    export(ExportConfig(run=str(out.root), repo=str(tmp_path / "repo"), top_k=3))
    served, reference = open_onnx_classifier(tmp_path / "repo"), load_reference(out.root, top_k=3)
    assert served.index.card_spec.nearest
    emails = ["Please refund my order", "My invoice shows the wrong amount", "Can I book a demo with sales?"]
    for got, want in zip(served.classify(emails), reference.classify(emails), strict=True):
        assert got.top_labels == want.top_labels and np.allclose(got.top_probabilities, want.top_probabilities, atol=1e-4)


def _cards(rng, n: int, spec: CardSpec) -> list:
    """n random cards as pieces, from words that stress tokenising piece by piece: punctuation, accents,
    a word longer than WordPiece's 100-character limit, cuts that fall inside words and separators."""
    words = ["refund", "card's", "top-up", "café", "naïve", "£20", "x" * 120, "|", "Examples:", "ünïcödé", "[CLS]",
             "don't", "3.5%", "e-mail", "\u00e9t\u00e9", "ok.", "?!"]
    text = lambda k: " ".join(rng.choice(words, size=k))  # noqa: E731
    return [spec.segments(text(int(rng.integers(1, 8))), [text(int(rng.integers(1, 40))) for _ in range(int(rng.integers(0, 4)))])
            for _ in range(n)]


def _base_tokenizer():
    from tokenizers import Tokenizer

    from training.models import base_model_dir

    tok = Tokenizer.from_file(str(base_model_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


def _tokens_of(parts, row: int) -> list:
    return parts.pool[parts.offsets[row]:parts.offsets[row] + parts.lengths[row]].tolist()


def test_card_segments_join_to_the_card_and_meet_at_spaces():
    rng = np.random.default_rng(0)
    for _ in range(300):
        spec = CardSpec(examples=int(rng.integers(0, 4)), chars=int(rng.integers(1, 400)), example_chars=int(rng.integers(1, 120)))
        for pieces in _cards(rng, 3, spec):
            assert all(pieces) and len("".join(pieces)) <= spec.chars
            assert all(a[-1].isspace() or b[0].isspace() for a, b in zip(pieces, pieces[1:]))
    spec = CardSpec(examples=2, chars=40, example_chars=8)
    assert spec.segments("d", ["first email", "second"]) == ["d", " Examples: ", "first em", " | ", "second"]
    assert spec.text("d", ["first email", "second"]) == "d Examples: first em | second"
    assert spec.segments("a long description", ["e"]) == ["a long description", " Examples: ", "e"]
    assert CardSpec(examples=1, chars=22).segments("a long description", ["email"]) == ["a long description", " Exa"]


def test_card_tokens_piece_by_piece_equal_tokenising_each_card_whole():
    from mailroute.pipeline import CardTokens

    tok, rng = _base_tokenizer(), np.random.default_rng(1)
    cards = CardTokens(tok)
    assert cards.by_pieces  # BERT's tokenizer splits words at whitespace first
    cards.unchecked = 0  # no safety net: the pieces alone must give the whole card's tokens
    batch = _cards(rng, 400, CardSpec(examples=3, chars=300, example_chars=90))
    pieces_of = lambda key: batch[key[0]]  # noqa: E731
    keys = np.concatenate([np.arange(400), np.arange(50)])  # a card shown for two pairs is tokenised once
    parts, row_of = cards(keys, pieces_of)
    assert len(parts.lengths) == 400 and len(row_of) == len(keys)
    for key, row in zip(keys, row_of):
        assert _tokens_of(parts, row) == tok.encode("".join(batch[key]), add_special_tokens=False).ids, batch[key]
    assert parts.encodings[int(row_of[7])].ids == _tokens_of(parts, row_of[7])  # the Assembler's checked row, merged
    remembered = len(cards.pieces), len(cards.cards)
    again, row_again = cards(np.arange(100)[::-1], pieces_of)  # the next batch's cards come from memory
    assert (len(cards.pieces), len(cards.cards)) == remembered
    assert _tokens_of(again, row_again[-1]) == _tokens_of(parts, row_of[0])


def test_card_tokens_tokenise_whole_cards_where_pieces_would_differ():
    """A byte-level BPE reads the space before a word as part of it: pieces meeting at a space tokenise otherwise
    than the card. Such a tokenizer gets whole cards, and one wrongly taken for a word splitter is caught by the
    check of the first cards."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from mailroute.pipeline import CardTokens

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["refund my card please | examples: top-up failed"] * 20,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    batch = _cards(np.random.default_rng(2), 50, CardSpec(examples=2, chars=200, example_chars=60))
    whole = [tok.encode("".join(c), add_special_tokens=False).ids for c in batch]
    pieces_of = lambda key: batch[key[0]]  # noqa: E731
    cards = CardTokens(tok)
    assert not cards.by_pieces
    parts, row_of = cards(np.arange(50), pieces_of)
    assert [_tokens_of(parts, r) for r in row_of] == whole
    fooled = CardTokens(tok)
    fooled.by_pieces = True
    parts, row_of = fooled(np.arange(50), pieces_of)
    assert not fooled.by_pieces and [_tokens_of(parts, r) for r in row_of] == whole
    # BERT's tokenizer with an added token that spans a space ("foo |" would straddle two pieces): whole cards
    bert = _base_tokenizer()
    assert CardTokens(bert).by_pieces
    bert.add_tokens(["foo |"])
    assert not CardTokens(bert).by_pieces
    parts, row_of = CardTokens(bert)(np.zeros((0, 3), np.int64), pieces_of)  # no pairs: nothing to tokenise
    assert len(row_of) == 0 and len(parts.lengths) == 0


def test_top_columns_pick_as_a_stable_sort_does():
    from mailroute.label_index import _top_columns

    rng = np.random.default_rng(3)
    for trial in range(500):
        x = (rng.integers(0, 4, (8, 20)) if trial % 2 else rng.normal(size=(8, 20))).astype(np.float32)  # ties, or none
        x[rng.random(x.shape) < 0.3] = -np.inf  # a label's padding slots
        n = int(rng.integers(1, 25))
        assert (_top_columns(x, n) == np.argsort(-x, axis=1, kind="stable")[:, :n]).all()
