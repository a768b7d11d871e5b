import json
import shutil

import numpy as np
import pytest

from mailroute import contract
from mailroute.label_index import IndexMismatch
from mailroute.pipeline import BadParameter
from mailroute.repository import ENCODER_ID_FILE, EXPORT_REPORT_FILE, MODEL_FILE, PIPELINE_FILE, TOKENIZER_FILE, open_onnx_classifier, version_dir
from mailroute.run_layout import RunFolder
from mailroute.settings import DEFAULTS, BadSetting
from training.reference import encoders_of_models

EMAILS = ["I was charged twice for my plan", "Where is my parcel? Tracking is stuck.", "The app crashes when I open settings",
          "Please send the March invoice", "How many vacation days are left?"]


def test_predictions_are_consistent(tiny_reference):
    preds = tiny_reference.classify(EMAILS)
    assert len(preds) == len(EMAILS)
    for p in preds:
        assert p.error == "" and len(p.top_labels) == 5 and len(set(p.top_labels)) == 5
        assert p.label == p.top_labels[0] and p.probability == p.top_probabilities[0]
        assert sum(p.top_probabilities) == pytest.approx(1.0, abs=1e-6)  # softmax over exactly the K candidates
        assert p.top_probabilities == sorted(p.top_probabilities, reverse=True)
        assert p.needs_review == (p.probability < DEFAULTS.threshold)


def test_batch_invariance_and_per_row_errors(tiny_reference):
    batch = tiny_reference.classify(EMAILS[:2] + [b"\xff", "   "] + EMAILS[2:])
    assert [bool(p.error) for p in batch] == [False, False, True, True, False, False, False]
    alone = [tiny_reference.classify([e])[0] for e in EMAILS]
    good = [p for p in batch if not p.error]
    assert [p.label for p in good] == [p.label for p in alone]
    assert np.allclose([p.probability for p in good], [p.probability for p in alone], atol=1e-5)


def test_thresholds_and_top_k_per_row(tiny_reference):
    preds = tiny_reference.classify(EMAILS[:2], top_k=np.array([2, 7]), threshold=np.array([0.0, 1.0]))
    assert [len(p.top_labels) for p in preds] == [2, 7]
    assert [p.needs_review for p in preds] == [False, True]


@pytest.mark.parametrize("k,t,msg", [(0, 0.5, "top_k must be between 1 and 50"), (51, 0.5, "between 1 and 50"),
                                     ("x", 0.5, "top_k must be an integer"), (2.5, 0.5, "integer"),
                                     (3, 1.5, "threshold must be between 0 and 1"), (3, "hi", "threshold must be a number"),
                                     (True, 0.5, "top_k must be an integer, got True"), (3, True, "threshold must be a number, got True")])
def test_bad_parameters_are_named(k, t, msg):
    from mailroute.pipeline import check_params

    with pytest.raises(BadParameter, match=msg):
        check_params(k, t, 50)


def test_reference_encoders_embed_like_sentence_transformers_encode(tiny_models):
    bi, _ = tiny_models
    tok = bi.tokenizer(EMAILS, padding=True, return_tensors="np")
    ours = encoders_of_models(bi, tiny_models[1]).embed(tok["input_ids"].astype(np.int64), tok["attention_mask"].astype(np.int64))
    theirs = bi.encode(EMAILS, normalize_embeddings=True)
    assert np.abs(ours - theirs).max() < 1e-5


def test_export_writes_contract_names_and_parity(tiny_repo):
    import onnx

    for name, inputs, output in [(contract.BI_ENCODER, contract.BI_ENCODER_INPUTS, contract.EMBEDDING),
                                 (contract.CROSS_ENCODER, contract.CROSS_ENCODER_INPUTS, contract.LOGIT)]:
        g = onnx.load(str(version_dir(tiny_repo, name) / MODEL_FILE)).graph
        assert [i.name for i in g.input] == list(inputs) and [o.name for o in g.output] == [output]
        assert g.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic axes
        assert g.input[0].type.tensor_type.shape.dim[1].dim_param == "sequence"
    report = json.loads((version_dir(tiny_repo, contract.CLASSIFIER) / EXPORT_REPORT_FILE).read_text())
    # the report records the parity measured for every graph exported (a difference beyond PARITY_ATOL stops the export:
    # test_parity_check_fails_beyond_tolerance)
    assert set(report["parity_max_abs_diff"]) == {m for m in contract.ENCODERS if (tiny_repo / m).is_dir()}


@pytest.mark.parametrize("flags,msg", [({"threshold": 1.5}, r"--threshold 1.5: threshold must be between 0 and 1"),
                                       ({"threshold": float("nan")}, r"--threshold nan: threshold must be between 0 and 1"),
                                       ({"top_k": -1}, r"--top-k -1: top_k must be between 1 and \d+ \(labels in the taxonomy\), got -1"),
                                       ({"version": -1}, r"--version must be a whole number >= 0, got -1"),
                                       ({"quantize_eval": -5}, r"--quantize-eval must be a whole number >= 0, got -5")])
def test_export_refuses_serving_defaults_the_pipeline_would_refuse(tiny_run, tmp_path, flags, msg):
    """pipeline.json's top_k and threshold are checked by the pipeline's own rule (check_params) before any work, and so are
    --version and --quantize-eval: a typo is a BadSetting naming the flag, not a version that fails only when Triton loads it
    (or an export that fails after its ONNX work)."""
    from export.run import ExportConfig, export

    repo = tmp_path / "repo"
    (repo / contract.CLASSIFIER / "1").mkdir(parents=True)  # a version already there: nothing is added beside it
    with pytest.raises(BadSetting, match=msg):
        export(ExportConfig(run=str(tiny_run), repo=str(repo), **flags))
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*")) == [contract.CLASSIFIER, f"{contract.CLASSIFIER}/1"]


def test_parity_check_fails_beyond_tolerance(tiny_models, tiny_run, tmp_path):
    from export.onnx_export import ParityError, export_bi_encoder

    with pytest.raises(ParityError, match=r"bi_encoder: ONNX differs from PyTorch by .* over the 1e-12 tolerance"):
        export_bi_encoder(tiny_models[0], RunFolder(tiny_run).bi_encoder / TOKENIZER_FILE, tmp_path / "b.onnx", EMAILS, atol=1e-12)


def test_onnx_pipeline_agrees_with_pytorch_reference(tiny_repo, tiny_reference):
    onnx_clf = open_onnx_classifier(tiny_repo)
    a, b = onnx_clf.classify(EMAILS), tiny_reference.classify(EMAILS)
    assert [p.top_labels for p in a] == [p.top_labels for p in b]
    assert np.abs(np.array([p.top_probabilities for p in a]) - np.array([p.top_probabilities for p in b])).max() < 1e-4


def test_classifier_refuses_an_index_from_another_bi_encoder(repo):
    (version_dir(repo, contract.BI_ENCODER) / ENCODER_ID_FILE).write_text("0123456789abcdef\n")
    with pytest.raises(IndexMismatch, match=r"email_classifier 1 pins bi_encoder 1: label index .* built from bi-encoder '[0-9a-f]+', but is used with '0123456789abcdef'"):
        open_onnx_classifier(repo)


def test_int8_quantisation_runs_and_stays_close(tiny_repo, tmp_path):
    from export.onnx_export import quantize_int8
    from mailroute.onnx_encoders import session

    src = version_dir(tiny_repo, contract.BI_ENCODER) / MODEL_FILE
    quantize_int8(src, tmp_path / "q.onnx")
    ids = np.array([[101, 2054, 2003, 102]], dtype=np.int64)
    feed = {contract.INPUT_IDS: ids, contract.ATTENTION_MASK: np.ones_like(ids)}
    a, b = session(src).run(None, feed)[0], session(tmp_path / "q.onnx").run(None, feed)[0]
    assert a.shape == b.shape and float((a @ b.T)[0, 0]) > 0.9  # unit vectors, nearly the same direction


def test_quantized_export_measures_what_it_ships(tiny_run, tmp_path, demo):
    from export.run import ExportConfig, export

    # Given a run exported as int8 with K=4
    report = export(ExportConfig(run=str(tiny_run), repo=str(tmp_path / "repo"), top_k=4, quantize=True, quantize_eval=20))
    # Then the accuracy change was measured with the shipped K, and the version ships that K and the run's policy
    assert report["int8"]["top_k"] == 4 and report["int8"]["emails"] == 20
    spec = json.loads((tmp_path / "repo" / contract.CLASSIFIER / "1" / PIPELINE_FILE).read_text())
    assert spec["top_k"] == 4 and spec["policy"] == json.loads(RunFolder(tiny_run).policy.read_text())
    # and its label index (descriptions + every exemplar) was embedded by the shipped int8 graph: it loads pinned to it
    clf = open_onnx_classifier(tmp_path / "repo")
    assert clf.index.manifest["exemplars"] == len(demo.train) and clf.index.cards is not None
    assert clf.classify(EMAILS[:2])[0].error == ""


def test_pairs_tokenised_once_equal_tokenising_every_pair(tiny_repo):
    """Stage 2 tokenises each email once and each label once, then assembles the pairs: the tensors the
    cross-encoder gets equal encode_batch on every (email, label text) pair, also where an email or a
    label card is longer than the pair budget (longest-first truncation) and for a one-word email."""
    from mailroute.pipeline import tensors

    clf = open_onnx_classifier(tiny_repo)
    long_card = "refund card payment declined " * 60  # ~240 tokens: more than the 160-token pair budget
    clf.label_texts = list(clf.label_texts)
    clf.label_texts[1] = long_card
    emails = ["Refund?", "I was charged twice, please refund. " * 40, "Where is my parcel? It has not moved since Monday.", "x"]
    cand = [np.array([0, 1, 2]), np.array([1, 3]), np.array([1]), np.array([4, 0, 1])]
    seen = []

    class Recorder:
        def score(self, ids, mask, types):
            seen.append((ids, mask, types))
            return np.zeros(len(ids), np.float32)

    clf.encoders, clf.score_batch = Recorder(), 4  # several chunks
    assert clf._score(emails, cand).shape == (9,)
    pairs = [(e, clf.label_texts[c]) for e, cs in zip(emails, cand) for c in cs]
    assert len(seen) == -(-len(pairs) // 4)  # 9 pairs in chunks of 4: three calls, each checked below
    for s, (ids, mask, types) in zip(range(0, len(pairs), 4), seen):
        want = tensors(clf.cross_tok.encode_batch(pairs[s:s + 4]))
        for got, ref in zip((ids, mask, types), want):
            assert got.dtype == ref.dtype and got.shape == ref.shape and (got == ref).all()
    assert max(a[0].shape[1] for a in seen) == 160  # the long rows were cut to the budget


def test_each_email_tokenised_once_for_both_stages_gives_the_same_answers(tiny_repo):
    """score_candidates tokenises a batch once (no special tokens) and builds both encoders' inputs from it by
    their tokenizers' post-processing: the bi-encoder gets the tensors encode_batch gives (also past its 128-token
    cut), and every answer equals the one of a classifier whose stages tokenise for themselves."""
    from mailroute.pipeline import Parts, tensors

    clf = open_onnx_classifier(tiny_repo)
    emails = ["Refund?", "I was charged twice, please refund the extra charge. " * 30, "Where is my parcel?", "x"]
    assert clf._tokenizers()[2] is not None  # bi and cross tokenizers of a run differ only in their lengths
    parts = clf._tokenizers()[0].encode_batch(emails, add_special_tokens=False)
    seen, flat_seen = [], []

    class Recorder:
        def __init__(self, inner):
            self.inner = inner

        def embed(self, ids, mask):
            seen.append((ids, mask))
            return self.inner.embed(ids, mask)

        def flat_embed(self, ids, mask):
            flat_seen.append((ids, mask))
            return self.inner.flat_embed(ids, mask)

        def score(self, *a):
            return self.inner.score(*a)

    clf.encoders = Recorder(clf.encoders)
    clf.embed(emails, Parts.of(parts))
    want = tensors(clf.bi_tok.encode_batch(emails))
    assert (seen[0][0] == want[0]).all() and (seen[0][1] == want[1]).all() and seen[0][0].shape[1] == 128
    shared = clf._tokenizers()[0]
    calls = []
    real_encode_batch = shared.encode_batch
    shared_spy = type("Spy", (), {"encode_batch": lambda self, texts, *a, **kw: calls.append(list(texts)) or real_encode_batch(texts, *a, **kw),
                                  "__getattr__": lambda self, name: getattr(shared, name)})()
    clf._toks = (shared_spy,) + clf._toks[1:]
    once = clf.classify(emails, gate=False)
    # the flat classifier (the tiny run's policy fuses it) reads the very tensors stage 1 read
    assert len(flat_seen) == 1 and all((f == b).all() for f, b in zip(flat_seen[0], seen[-1]))
    email_calls = [c for c in calls if c != list(clf.label_texts)]  # (the labels are tokenised once per classifier)
    assert [len(c) for c in email_calls] == [len(emails)]  # one tokenisation of the (normalised) batch serves both stages
    clf._toks = (shared,) + clf._toks[1:2] + (None,)  # as if the tokenizers differed: each stage tokenises itself
    for a, b in zip(once, clf.classify(emails, gate=False), strict=True):
        assert a.top_labels == b.top_labels and np.allclose(a.top_probabilities, b.top_probabilities, atol=1e-6)


def _post_processed(tok, firsts, seconds=None):
    from mailroute.pipeline import padded_tensors

    return padded_tensors([tok.post_process(a) if seconds is None else tok.post_process(a, b)
                           for a, b in zip(firsts, seconds or firsts)])


@pytest.mark.parametrize("variant", ["bert", "left", "untruncated", "roberta-like", "no-trailing", "only_first"])
def test_assembler_gives_post_process_tensors_for_every_length(variant):
    """The batch assembly equals post_process row by row for every (email, label) length combination around
    the truncation budget (ties, one side longer, both cut), special-token text inside an email, truncation
    from the left, no truncation, another post-processor (its layout found on the first row) and a truncation
    rule it does not know (then post_process itself, row by row)."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    from mailroute.pipeline import Assembler, Parts
    from training.models import base_model_dir

    tok = Tokenizer.from_file(str(base_model_dir() / "tokenizer.json"))
    tok.no_padding()
    split = Tokenizer.from_str(tok.to_str())
    split.no_truncation()
    if variant == "untruncated":
        tok.no_truncation()
    else:
        tok.enable_truncation(24, direction="left" if variant == "left" else "right",
                              strategy="only_first" if variant == "only_first" else "longest_first")
    if variant == "roberta-like":  # A and B both type 0, two separators between them, no [CLS]
        tok.post_processor = TemplateProcessing(single="$A [SEP]", pair="$A [SEP] [SEP] $B:0 [SEP]", special_tokens=[("[SEP]", 102)])
    if variant == "no-trailing":  # nothing after the last part
        tok.post_processor = TemplateProcessing(single="[CLS] $A", pair="[CLS] $A $B:1", special_tokens=[("[CLS]", 101)])
    words = ("refund", "card", "[SEP]", "blocked", "transfer", "pending")
    # the first rows spell special tokens: the layout must not be learnt from them
    texts = ["[CLS]", "[CLS] [SEP]"] + [" ".join(words[(i + j) % len(words)] for j in range(n)) for i, n in enumerate(range(1, 31))]
    parts = split.encode_batch(texts, add_special_tokens=False)
    first = Parts.of(parts)
    rows = np.array([(i, j) for i in range(len(parts)) for j in range(len(parts))
                     if variant != "only_first" or len(parts[j].ids) <= 20])  # only_first refuses a B it cannot fit
    assemble = Assembler(tok)
    for r in (rows, rows[::-7]):  # twice: lengths checked the first time are remembered the second
        got = assemble(first, r[:, 0], first, r[:, 1])
        want = _post_processed(tok, [parts[i] for i in r[:, 0]], [parts[j] for j in r[:, 1]])
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and g.shape == w.shape and (g == w).all()
        single = assemble(first, r[:, 0])
        for g, w in zip(single, _post_processed(tok, [parts[i] for i in r[:, 0]]), strict=True):
            assert g.shape == w.shape and (g == w).all()
    # the rule it knows reproduces every length combination as arrays; one it does not know is left to post_process
    fallback = [v is None for v in assemble.checked.values()]
    assert len(fallback) > 30 and (all(fallback) if variant == "only_first" else not any(fallback))


def test_export_keeps_the_runs_card_format(tiny_repo):
    """The exported index (re-embedded by the exported graph) records the card format of the run's index, so labels
    added to that version later are carded alike."""
    from dataclasses import asdict, replace

    from export.run import label_index_from_onnx
    from mailroute.label_index import CardSpec
    from mailroute.repository import MODEL_FILE, TOKENIZER_FILE

    source = open_onnx_classifier(tiny_repo).index
    source = replace(source, manifest=source.manifest | {"cards": asdict(CardSpec(examples=3, chars=300))})
    bi_dir = version_dir(tiny_repo, contract.BI_ENCODER)
    assert label_index_from_onnx(bi_dir / MODEL_FILE, bi_dir / TOKENIZER_FILE, source).card_spec == CardSpec(examples=3, chars=300)


@pytest.mark.parametrize("policy_text,msg", [(None, r"has no rerank_policy\.json: its training stopped before the rerank policy was fitted"),
                                             ('{"retrieval_weight": 20', r"rerank_policy\.json is not a rerank policy: Expecting"),
                                             ('{"retrieval_weight": "20"}', r"rerank_policy\.json is not a rerank policy: .*retrieval_weight must be a number")])
def test_export_refuses_a_run_without_a_readable_policy_before_any_work(tiny_run, tmp_path, policy_text, msg):
    """A run whose training stopped after the cross-encoder (no policy yet) or whose policy file is cut off or edited is
    refused by name, before the models load: serving it would silently drop the fitted fusion, temperature and gate."""
    from export.run import ExportConfig, export
    from mailroute.settings import BrokenFile

    run = shutil.copytree(tiny_run, tmp_path / "run")
    policy = RunFolder(run).policy
    policy.unlink() if policy_text is None else policy.write_text(policy_text)
    repo = tmp_path / "repo"
    with pytest.raises(FileNotFoundError if policy_text is None else BrokenFile, match=msg):
        export(ExportConfig(run=str(run), repo=str(repo)))
    assert not repo.exists()  # refused before the repository is touched


def test_the_label_index_graph_embeds_as_the_served_classifier_and_refuses_to_score(tiny_repo):
    """Export builds the label index with the bi-encoder graph alone (OnnxEncoders without a cross-encoder): its
    embeddings are the served classifier's, and it cannot be mistaken for a whole pipeline."""
    from export.run import onnx_embed
    from mailroute.onnx_encoders import OnnxEncoders
    from mailroute.pipeline import load_tokenizer

    bi_dir = version_dir(tiny_repo, contract.BI_ENCODER)
    graph = OnnxEncoders(bi_dir / MODEL_FILE)
    ours = onnx_embed(graph, load_tokenizer(bi_dir / TOKENIZER_FILE, DEFAULTS.max_email_tokens), EMAILS, batch=2)
    served = open_onnx_classifier(tiny_repo).embed(EMAILS)
    assert ours.shape == served.shape and np.abs(ours - served).max() < 1e-6
    ids = np.ones((1, 4), np.int64)
    with pytest.raises(ValueError, match="bi-encoder alone"):
        graph.score(ids, ids, np.zeros_like(ids))
