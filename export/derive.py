"""New classifier versions derived from an existing one without retraining the bi-encoder:

  - corrected emails become exemplars of their label (the first speed of feedback: at once);
  - a new label (name, description, optional examples) joins the taxonomy (zero-shot: scored by its
    description, and by its examples when given);
  - a new cross-encoder version (continued training) is pinned instead of the old one.

The bi-encoder version stays pinned and every new vector is embedded with its exported graph, so the
label index's encoder checksum still matches and the new version loads where the old one did. The flat
classifier (its encoder version and head) is kept where the taxonomy is; a new label drops it, since its head
has no row for the label: the version answers by the two stages alone, with the policy fitted for them in the
same run (pipeline.json's policy_without_flat; a version exported without one keeps its weights, flat terms 0).
"""

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from mailroute import contract
from mailroute.label_index import LabelIndex
from mailroute.pipeline import load_tokenizer
from mailroute.repository import (ADAPTER_FILE, ENCODER_ID_FILE, FLAT_HEAD_FILE, LABEL_INDEX_DIR, MODEL_FILE, PIPELINE_FILE,
                                  TOKENIZER_FILE, TORCH_WEIGHTS_DIR, TRTEXEC_SHAPES_FILE, load_label_index, read_pipeline, utc_stamp,
                                  version_dir, write_pipeline)
from mailroute.rerank_policy import RerankPolicy
from mailroute.settings import DEFAULTS
from mailroute.taxonomy import NAME_RE, DataError, Label, parse_taxonomy
from export.versions import new_version


def embed_with_version(repo, bi_version: int, texts: list) -> np.ndarray:
    """(n,) texts -> (n, dim) embeddings by the exported graph of one bi-encoder version."""
    from export.run import onnx_embed
    from mailroute.onnx_encoders import OnnxEncoders

    bdir = version_dir(repo, contract.BI_ENCODER, bi_version)
    return onnx_embed(OnnxEncoders(bdir / MODEL_FILE), load_tokenizer(bdir / TOKENIZER_FILE, DEFAULTS.max_email_tokens), list(texts))


def _vectors(index) -> np.ndarray:
    return index.reconstruct_n(0, index.ntotal) if index is not None and index.ntotal else np.zeros((0, 1), np.float32)


def derived_index(repo, base_dir: Path, exemplars: list = (), new_labels: list = ()) -> LabelIndex:
    """The base version's label index plus exemplars [(text, label)] and new labels [(Label, [examples])]."""
    spec = read_pipeline(base_dir)
    old = load_label_index(repo, base_dir)
    taken = set(old.taxonomy.names)
    for label, _ in new_labels:
        if label.name in taken:
            raise DataError(f"label {label.name!r} is already in the taxonomy of {contract.CLASSIFIER} {base_dir.name}")
        taken.add(label.name)
    taxonomy = parse_taxonomy({"name": old.taxonomy.name, "labels": [vars(l) for l in old.taxonomy.labels] + [vars(l) for l, _ in new_labels]})
    exemplars = list(exemplars) + [(text, label.name) for label, examples in new_labels for text in examples]
    for text, name in exemplars:
        taxonomy.index(name)  # DataError naming the unknown label
    new_texts = [label.text() for label, _ in new_labels] + [t for t, _ in exemplars]
    x_new = embed_with_version(repo, spec.bi_encoder_version, new_texts) if new_texts else None
    n_labels = len(new_labels)
    xb = np.concatenate([_vectors(old.index)] + ([x_new[:n_labels]] if n_labels else []))
    xe_old = _vectors(old.exemplar_index) if old.exemplar_index is not None else np.zeros((0, xb.shape[1]), np.float32)
    xe = np.concatenate([xe_old] + ([x_new[n_labels:]] if exemplars else []))
    ids = np.concatenate([old.exemplar_labels, np.array([taxonomy.index(n) for _, n in exemplars], dtype=np.int64)])
    cards = None
    if old.cards is not None:
        cards = list(old.cards) + [old.card_spec.text(label.text(), examples) for label, examples in new_labels]  # the run's format
    return LabelIndex.build(taxonomy, xb, old.manifest["encoder"], xe if len(xe) else None, ids, list(old.exemplar_texts) + [t for t, _ in exemplars],
                            old.scoring, cards, old.card_spec)


def derive_version(repo, base: int, kind: str, exemplars: list = (), new_labels: list = (), cross_encoder_version: int = None,
                   policy: dict = None, note: str = "", feedback: dict = None, policy_without_flat: dict = None) -> int:
    """Write a new classifier version (atomically, not served yet) from classifier version `base`. policy_without_flat:
    the two stages' own fit beside a refitted `policy` (else the base's is kept)."""
    repo = Path(repo)
    base_dir = version_dir(repo, contract.CLASSIFIER, base)
    spec = read_pipeline(base_dir)
    spec.rerank_policy(base_dir / PIPELINE_FILE)  # a derived version serves its base's policy: refuse a broken one now
    index = derived_index(repo, base_dir, exemplars, new_labels)
    with new_version(repo, contract.CLASSIFIER) as (folder, v):
        index.save(folder / LABEL_INDEX_DIR)
        # the parent's adapter, not this checkout's: it is known to load on the image that serves the parent, whose
        # installed mailroute may be older than this CLI (a new version never needs a new image)
        shutil.copy(base_dir / ADAPTER_FILE, folder / ADAPTER_FILE)
        spec = replace(spec, kind=kind, parent=int(base_dir.name), note=note, created=utc_stamp(), feedback=feedback)
        if cross_encoder_version is not None:
            version_dir(repo, contract.CROSS_ENCODER, cross_encoder_version)  # exists, or FileNotFoundError
            spec = replace(spec, cross_encoder_version=int(cross_encoder_version))
        if policy is not None:
            spec = replace(spec, policy=policy)
            if not RerankPolicy.from_dict(policy).uses_flat:  # refitted without the flat classifier (a feedback round under
                # --flat-fusion auto): the version neither pins nor serves it, and the base's two-stage fit is not its own
                spec = replace(spec, flat_encoder_version=None, policy_without_flat=None)
        if policy_without_flat is not None:
            spec = replace(spec, policy_without_flat=policy_without_flat)
        if spec.flat_encoder_version is not None and not new_labels:
            shutil.copy(base_dir / FLAT_HEAD_FILE, folder / FLAT_HEAD_FILE)
        elif spec.flat_encoder_version is not None:  # the head has no row for a new label: the two stages answer alone, by
            # their own fit where the export kept one (else the same weights without the flat term)
            policy = spec.policy_without_flat or spec.rerank_policy(base_dir / PIPELINE_FILE).without_flat().to_dict()
            spec = replace(spec, flat_encoder_version=None, policy=policy, policy_without_flat=None)
        write_pipeline(folder, spec)
    return v


def write_cross_encoder_version(repo, cross_model, pairs: list, quantize: bool = False) -> int:
    """A continued-training cross-encoder -> a new cross_encoder version (ONNX, parity-checked; int8 when the
    version it replaces was), atomically."""
    from export.onnx_export import export_cross_encoder, quantize_int8
    from mailroute.label_index import weights_id

    repo = Path(repo)
    prev = version_dir(repo, contract.CROSS_ENCODER)
    with new_version(repo, contract.CROSS_ENCODER) as (folder, v):
        cross_model.save(str(folder / TORCH_WEIGHTS_DIR))  # what the next round of continued training starts from
        shutil.copy(folder / TORCH_WEIGHTS_DIR / TOKENIZER_FILE, folder / TOKENIZER_FILE)
        from export import configs, versions

        served = configs.runtime(configs.runtime_of(versions.read_model_config(repo, contract.CROSS_ENCODER)))
        fused = served.fused_graph
        export_cross_encoder(cross_model, folder / TOKENIZER_FILE, folder / "fp32.onnx", pairs, optimize=fused)
        if quantize:
            quantize_int8(folder / "fp32.onnx", folder / MODEL_FILE)
            (folder / "fp32.onnx").unlink()
        else:
            (folder / "fp32.onnx").rename(folder / MODEL_FILE)
        (folder / ENCODER_ID_FILE).write_text(weights_id(folder / MODEL_FILE) + "\n")
        if not fused and not quantize:  # a graph TensorRT parses: docker/build_tensorrt.sh builds its plan, as for an export
            (folder / TRTEXEC_SHAPES_FILE).write_text(configs.trtexec_shapes(contract.CROSS_ENCODER))
        if served.adapter:  # a Python-backend runtime (portable, torch): the previous version's adapter (it loads on the
            shutil.copy(prev / ADAPTER_FILE, folder / ADAPTER_FILE)  # serving image; versions share one runtime)
    return v


def label_from_args(name: str, description: str, group: str = "") -> Label:
    """A new taxonomy entry, checked by the taxonomy's own rules (DataError naming what is wrong)."""
    name, description = str(name).strip(), " ".join(str(description).split())
    if not NAME_RE.match(name):
        raise DataError(f"new label: name {name!r} must be printable text of at most 100 characters")
    if not description:
        raise DataError(f"new label {name!r}: a description is needed (the label index and the cross-encoder read it)")
    return Label(name, description, group.strip())

