"""pipeline.json of a classifier version through mailroute.repository.PipelineSpec, the one place its keys are named."""

import json

import pytest

from mailroute.repository import PIPELINE_FILE, PipelineSpec, read_pipeline, write_pipeline
from mailroute.rerank_policy import RerankPolicy
from mailroute.settings import DEFAULTS


def test_a_spec_round_trips_and_keeps_keys_it_does_not_know(tmp_path):
    # Given a pipeline.json written by a newer mailroute, with a key this one does not know
    written = {"bi_encoder_version": "2", "cross_encoder_version": 3, "policy": RerankPolicy(retrieval_weight=4.0).to_dict(),
               "kind": "continued", "parent": 1, "runtime_hint": {"any": "thing"}}
    (tmp_path / PIPELINE_FILE).write_text(json.dumps(written))
    # When it is read and written back
    spec = read_pipeline(tmp_path)
    write_pipeline(tmp_path, spec)
    # Then the pins are ints, what it leaves out takes the defaults, and the unknown key survives unchanged
    assert (spec.bi_encoder_version, spec.cross_encoder_version, spec.parent) == (2, 3, 1)
    assert spec.top_k == DEFAULTS.top_k and spec.threshold == DEFAULTS.threshold and spec.source_run is None
    assert spec.rerank_policy() == RerankPolicy(retrieval_weight=4.0)
    again = json.loads((tmp_path / PIPELINE_FILE).read_text())
    assert again["runtime_hint"] == {"any": "thing"} and again["bi_encoder_version"] == 2 and "source_run" not in again
    assert read_pipeline(tmp_path) == spec


@pytest.mark.parametrize("text, message", [("{}", "pins no bi_encoder_version and no cross_encoder_version"),
                                           ('{"bi_encoder_version": 1}', "pins no cross_encoder_version"),
                                           ('{"bi_encoder_version": null, "cross_encoder_version": 1}', "not numbers"),
                                           ("[1, 2]", "holds list, not a JSON object"),
                                           ("{torn", "Expecting")])
def test_a_spec_without_its_pins_is_refused_naming_what_is_missing(tmp_path, text, message):
    (tmp_path / PIPELINE_FILE).write_text(text)
    with pytest.raises(ValueError, match=message):
        read_pipeline(tmp_path)


def test_an_exported_spec_names_only_what_it_has():
    spec = PipelineSpec(1, 1, 5, 0.5, {}, created="2026-11-28T00:00:00Z", source_run="runs/x")
    assert set(spec.to_dict()) == {"bi_encoder_version", "cross_encoder_version", "top_k", "threshold", "policy", "kind", "created",
                                   "source_run", "quantized"}


def test_the_model_py_of_an_earlier_version_still_reads_it_as_a_dict(tmp_path):
    """Each version keeps its own model.py (derived ones copy their parent's); the ones exported before PipelineSpec
    subscript what read_pipeline returns: `int(spec["bi_encoder_version"])`, `spec.get(...)`."""
    write_pipeline(tmp_path, PipelineSpec(4, 7, 3, 0.4, {}, source_run="runs/x"))
    spec = read_pipeline(tmp_path)
    assert (int(spec["bi_encoder_version"]), int(spec["cross_encoder_version"])) == (4, 7)
    assert spec.get("top_k", 5) == 3 and spec.get("parent") is None and "source_run" in spec and "parent" not in spec
    with pytest.raises(KeyError):
        spec["parent"]
