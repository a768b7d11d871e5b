"""Stage 3 in-process, on the tiny exported repository: atomic versions, corrections as exemplars,
continued listwise training, the gate, a label added at run time, promote / rollback / prune on disk.
(The same against the real tritonserver, under load: tests/test_versions_triton.py.)"""

import json
import shutil

import numpy as np
import pytest

from export import versions
from export.derive import derive_version
from mailroute import contract
from mailroute.feedback_store import FeedbackStore
from mailroute.repository import GATE_REPORT_FILE, PIPELINE_FILE, open_onnx_classifier, read_pipeline, version_dir
from mailroute.rerank_policy import RerankPolicy
from training.data import Example
from training.feedback import FeedbackConfig, add_label, build_candidate, correction_lists, held_out


@pytest.fixture()
def store(tmp_path, repo):
    names = open_onnx_classifier(repo).index.taxonomy.names
    with FeedbackStore(f"sqlite:///{tmp_path}/fb.sqlite3", labels=names) as s:
        yield s


def wrong_answers(clf, examples, n):
    preds = clf.classify_texts([e.text for e in examples], [""] * len(examples))
    return [(e, p) for e, p in zip(examples, preds) if p.label != e.label][:n]


def correct_mistakes(store, wrong, who="reviewer"):
    """Record what the system answered, then correct each answer to the gold label (as reviewers do)."""
    ids = store.record([e.text for e, _ in wrong], [p for _, p in wrong])
    for pid, (e, _) in zip(ids, wrong):
        store.correct(pid, e.label, who=who)


def test_a_failed_version_write_leaves_nothing(repo):
    before = versions.versions(repo, contract.CLASSIFIER)
    with pytest.raises(RuntimeError, match="half written"):
        with versions.new_version(repo, contract.CLASSIFIER) as (folder, v):
            (folder / PIPELINE_FILE).write_text("{}")
            raise RuntimeError("half written")
    assert versions.versions(repo, contract.CLASSIFIER) == before
    assert not list((repo / contract.CLASSIFIER).glob(".staging-*"))
    # a staging folder of a dead writer is found and removed
    (repo / contract.CLASSIFIER / ".staging-9-999999999").mkdir()
    assert versions.remove_stale_staging(repo) and not list((repo / contract.CLASSIFIER).glob(".staging-*"))


def test_exemplar_promotion_changes_answers_without_touching_encoders(repo, store, demo):
    # Given emails the serving version gets wrong, corrected to their gold label
    clf = open_onnx_classifier(repo)
    wrong = wrong_answers(clf, demo.test, 12)
    assert len(wrong) >= 6
    correct_mistakes(store, wrong)
    # When corrections become exemplars of a new version (the first speed: no training)
    report = build_candidate(FeedbackConfig(repo=str(repo), exemplars_only=True, holdout_fraction=0.0), store)
    v = report["version"]
    new, old = read_pipeline(version_dir(repo, contract.CLASSIFIER, v)), read_pipeline(version_dir(repo, contract.CLASSIFIER, 1))
    # Then the encoders are the same versions (the index's checksum still matches: it loads) ...
    assert (new.bi_encoder_version, new.cross_encoder_version) == (old.bi_encoder_version, old.cross_encoder_version)
    assert new.kind == "exemplars" and new.parent == 1 and report["new_exemplars"] == len(wrong)
    assert new.feedback["new_exemplars"] == len(wrong) and new.source_run == old.source_run  # the run it came from, inherited
    after = open_onnx_classifier(repo, v).classify_texts([e.text for e, _ in wrong], [""] * len(wrong))
    fixed = sum(p.label == e.label for (e, _), p in zip(wrong, after))
    # ... and the corrected emails now get their corrected label (they were all wrong before); not every one:
    # an exact exemplar is one of the label's top-3 exemplar cosines, and the tiny random cross-encoder still reranks
    assert fixed >= 0.5 * len(wrong), f"only {fixed} of {len(wrong)} corrected emails changed to their label"
    assert versions.serving_version(repo) == 1  # a candidate is not served until promoted
    assert json.loads((version_dir(repo, contract.CLASSIFIER, v) / GATE_REPORT_FILE).read_text())["candidate"]["version"] == v


def test_correction_lists_hold_gold_and_the_wrong_choice(repo):
    index = open_onnx_classifier(repo).index
    names = index.taxonomy.names

    class C:
        text, label, wrong_label = "refund my double charge", names[3], names[7]

    scores = np.zeros((1, len(names)))
    scores[0, [10, 11, 12]] = [0.9, 0.8, 0.7]
    rows = correction_lists(index, scores, [C()], k=3, seed=0)
    docs = rows["docs"][0]
    assert len(docs) == 5 and sum(rows["labels"][0]) == 1  # gold + wrong + top-3, deduplicated
    assert docs[rows["labels"][0].index(1)] == index.label_texts[3] and index.label_texts[7] in docs
    # each candidate's retrieval score rides along, in the trainer's column order, for a run trained with a retrieval weight
    assert list(rows) == ["query", "docs", "retrieval", "labels"]
    assert sorted(rows["retrieval"][0], reverse=True)[:3] == pytest.approx([0.9, 0.8, 0.7])


def test_continued_training_moves_corrected_emails_to_their_label(repo, store, demo):
    import torch

    from training.feedback import cross_encoder_weights
    from training.models import load_cross_encoder

    clf = open_onnx_classifier(repo)
    wrong = wrong_answers(clf, demo.test, 8)
    correct_mistakes(store, wrong)
    cfg = FeedbackConfig(repo=str(repo), holdout_fraction=0.0, replay_ratio=1.0, epochs=10, lr=5e-3, batch_size=4, eval_limit=40)
    report = build_candidate(cfg, store)
    spec = read_pipeline(version_dir(repo, contract.CLASSIFIER, report["version"]))
    assert spec.kind == "continued" and spec.cross_encoder_version == report["cross_encoder_version"] == 2
    assert spec.policy == report["policy"]  # fitted again on the evaluation split for the new cross-encoder
    # the repository's version fuses the flat classifier (the tiny run does): the two stages' own fit is refitted beside it
    assert RerankPolicy.from_dict(spec.policy).uses_flat and spec.flat_encoder_version is not None
    assert spec.policy_without_flat and not RerankPolicy.from_dict(spec.policy_without_flat).uses_flat
    assert report["training"]["lists"] == len(wrong) + report["training"]["replay"] and report["training"]["replay"] == len(wrong)

    def gold_probability(weights):
        model = load_cross_encoder(weights)
        index = clf.index
        out = []
        for e, p in wrong:
            cand = list(dict.fromkeys([index.taxonomy.index(e.label), index.taxonomy.index(p.label)]))
            with torch.no_grad():
                logits = torch.tensor(model.predict([(e.text, index.label_texts[c]) for c in cand], show_progress_bar=False))
            out.append(float(torch.softmax(logits, 0)[0]))
        return np.mean(out)

    before = gold_probability(cross_encoder_weights(repo, 1))
    after = gold_probability(cross_encoder_weights(repo, 2))
    assert after > before + 0.2, f"gold vs wrong choice: {before:.3f} -> {after:.3f}"


def test_gate_holds_out_corrections_and_applies_the_margin(repo, store, demo):
    clf = open_onnx_classifier(repo)
    wrong = wrong_answers(clf, demo.test, 30)
    correct_mistakes(store, wrong)
    hashes = [c.text_hash for c in store.corrections()]
    held = sum(held_out(h, 0.5) for h in hashes)
    assert 0 < held < len(hashes)  # a fixed share by hash
    report = build_candidate(FeedbackConfig(repo=str(repo), exemplars_only=True, holdout_fraction=0.5, max_eval_drop=1.0), store)
    g = report["gate"]
    assert report["held_out"] == held == g["held_out_corrections"] and report["used"] == len(hashes) - held
    assert g["evaluation_emails"] > 0  # the source run's validation split (never test)
    assert g["passed"] == (g["candidate"]["corrections_accuracy"] > g["serving"]["corrections_accuracy"])
    held_texts = {c.text for c in store.corrections() if held_out(c.text_hash, 0.5)}
    learnt = set(open_onnx_classifier(repo, report["version"]).index.exemplar_texts)
    assert held_texts and not held_texts & learnt  # what the gate measures on was never learnt
    strict = build_candidate(FeedbackConfig(repo=str(repo), exemplars_only=True, holdout_fraction=0.5, max_eval_drop=-1.0), store)
    assert not strict["gate"]["passed"]  # a margin no candidate can meet
    listed = {r["version"]: r for r in versions.list_versions(repo)}
    assert listed[report["version"]]["gate"]["passed"] == g["passed"] and "FAILED" in versions.format_versions(list(listed.values()))


def test_label_added_at_run_time(repo, demo):
    example = "My smart fridge subscription renewed but the companion app still shows the trial banner."
    other = "The thermostat plan charged me although I cancelled the smart home subscription last week."
    evaluation = [Example(example, "smart_home_subscription"), Example(other, "smart_home_subscription")] + demo.test[:20]
    report = add_label(repo, " smart_home_subscription ", "questions about subscriptions for smart home devices",
                       examples=[example], evaluation=evaluation)
    v = report["version"]
    clf = open_onnx_classifier(repo, v)
    assert "smart_home_subscription" in clf.index.taxonomy and len(clf.index.taxonomy) == len(demo.taxonomy) + 1
    assert clf.classify([example])[0].label == "smart_home_subscription"  # its example is an exemplar
    # measured without the example (an exemplar answers itself): one email of the new label, 20 of the others
    assert report["new_label_emails"] == 1 and report["evaluation_emails"] == 21 and not report["zero_shot"]
    # the report's numbers, recomputed from both versions' answers on the 21 emails measured (the example left out)
    measured = [e for e in evaluation if e.text != example]
    texts = [e.text for e in measured]
    after = [p.label for p in clf.classify_texts(texts, [""] * len(texts))]
    before = [p.label for p in open_onnx_classifier(repo, report["base_version"]).classify_texts(texts, [""] * len(texts))]
    gold = [e.label for e in measured]
    assert "smart_home_subscription" not in before  # the base version cannot answer the new label
    assert report["new_label_recall"] == float(after[0] == "smart_home_subscription")  # `other`, the one email of the label
    assert report["accuracy_after"] == pytest.approx(np.mean([a == g for a, g in zip(after, gold)]))
    assert report["accuracy_before"] == pytest.approx(np.mean([b == g for b, g in zip(before, gold)]))
    zero = add_label(repo, "pet_insurance", "questions about insurance for pets", evaluation=demo.test[:5], base=v)
    assert zero["zero_shot"] and zero["new_label_emails"] == 0 and zero["new_label_recall"] is None
    assert read_pipeline(version_dir(repo, contract.CLASSIFIER, v)).bi_encoder_version == 1
    with pytest.raises(ValueError, match="already in the taxonomy"):
        add_label(repo, "smart_home_subscription", "again", base=v)


def test_rollback_walks_back_through_what_served(repo):
    label = open_onnx_classifier(repo).index.taxonomy.names[0]
    v2, v3 = (derive_version(repo, 1, "exemplars", [(f"refund please {i}", label)]) for i in (2, 3))
    versions.promote(repo, v2)
    versions.promote(repo, v3)
    assert versions.rollback(repo)["version"] == v2
    assert versions.rollback(repo)["version"] == 1  # a second rollback goes one further back, not forward to v3
    with pytest.raises(versions.VersionError, match="nothing to roll back to"):
        versions.rollback(repo)
    versions.promote(repo, v3)
    # a version prune cannot read stops it before anything is removed (the encoders it pins are unknown) ...
    with versions.new_version(repo, contract.CLASSIFIER) as (folder, bad):
        (folder / PIPELINE_FILE).write_text("{not json")
    with pytest.raises(versions.VersionError, match=f"v{bad} is kept but its pipeline file is unreadable"):
        versions.prune(repo, keep=1)
    assert versions.versions(repo, contract.CLASSIFIER) == [1, v2, v3, bad]
    # ... and once it is gone, prune keeps the rollback target even with keep=1
    shutil.rmtree(repo / contract.CLASSIFIER / str(bad))
    removed = versions.prune(repo, keep=1)
    assert v3 in versions.versions(repo, contract.CLASSIFIER)
    assert versions.rollback(repo)["version"] == 1 and removed[contract.CLASSIFIER] == [v2]


def test_gate_cannot_pass_without_held_out_mistakes(repo, store, demo):
    wrong = wrong_answers(open_onnx_classifier(repo), demo.test, 6)
    correct_mistakes(store, wrong)
    report = build_candidate(FeedbackConfig(repo=str(repo), exemplars_only=True, holdout_fraction=0.0, max_eval_drop=1.0), store)
    assert not report["gate"]["passed"] and report["gate"]["why"] == "no held-out corrections to measure on"
    assert report["gate"]["candidate"]["corrections_accuracy"] is None


def test_promote_rollback_prune_on_disk(repo):
    v2 = derive_version(repo, 1, "exemplars", [("please refund me", open_onnx_classifier(repo).index.taxonomy.names[0])])
    versions.promote(repo, v2)
    assert versions.serving_version(repo) == v2
    assert versions.rollback(repo)["version"] == 1 and versions.serving_version(repo) == 1
    with pytest.raises(versions.VersionError, match="no version 42"):
        versions.promote(repo, 42)
    # an encoder version no kept classifier pins is pruned; pinned ones and the serving classifier stay
    shutil.copytree(version_dir(repo, contract.CROSS_ENCODER, 1), repo / contract.CROSS_ENCODER / "7")
    removed = versions.prune(repo, keep=1)
    assert removed[contract.CROSS_ENCODER] == [7] and 1 in versions.versions(repo, contract.CLASSIFIER)
    with pytest.raises(versions.VersionError):
        versions.prune(repo, keep=0)
