"""`mailroute export`: a trained run -> ONNX (parity-checked) -> a new version in the Triton model repository.

Writes bi_encoder/<v>, cross_encoder/<v> (and flat_encoder/<v> where the run's policy fuses its flat classifier)
and email_classifier/<v> (which pins them), re-embeds the label texts with the exported bi-encoder so the index
matches what is served, pins the flat head to the exported flat encoder, and updates the config.pbtxt files (plus
configs/tensorrt.pbtxt for the production TensorRT plans).
"""

import json
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from mailroute import contract
from mailroute.flat_head import FlatHead
from mailroute.label_index import LabelIndex, weights_id
from mailroute.onnx_encoders import OnnxEncoders
from mailroute.pipeline import BadParameter, check_params, load_tokenizer, tensors
from mailroute.repository import (ADAPTER_FILE, ENCODER_ID_FILE, EXPORT_REPORT_FILE, FLAT_HEAD_FILE, LABEL_INDEX_DIR, MODEL_FILE,
                                  TENSORRT_CONFIG, TOKENIZER_FILE, TORCH_WEIGHTS_DIR, TRTEXEC_SHAPES_FILE, PipelineSpec, utc_stamp,
                                  write_pipeline)
from mailroute.rerank_policy import RerankPolicy
from mailroute.settings import DEFAULTS, BadSetting
from export import configs, versions
from export.versions import new_version
from export.config import ExportConfig  # noqa: F401 (re-exported for callers)
from export.onnx_export import export_bi_encoder, export_cross_encoder, quantize_int8
from export.runtimes import ADAPTERS_DIR, CLASSIFIER_ADAPTER, TENSORRT
from mailroute.run_layout import RunFolder
from training.evaluate import EVAL_BATCH
from training.models import load_bi_encoder, load_cross_encoder
from training.reference import load_flat, load_policy

PARITY_TEXTS = [
    "Hi, I was charged twice for my subscription this month. Please refund the extra charge.",
    "I can't log in, the password reset link never arrives.",
    "Where is my order? Tracking has not updated since Monday and I need it for a wedding on Saturday, please help!",
    "x",
]


def encoder_throughput(cfg: ExportConfig) -> configs.Throughput:
    """The throughput flags, checked (BadSetting naming the flag) before any work is done."""
    try:
        sizes = tuple(int(b) for b in cfg.preferred_batch_sizes.split(",") if b.strip())
    except ValueError:
        raise BadSetting(f"--preferred-batch-sizes must be comma-separated whole numbers, e.g. 16,32,64; got {cfg.preferred_batch_sizes!r}") from None
    for flag, value, least in (("--preferred-batch-sizes", min(sizes, default=1), 1), ("--max-queue-delay-us", cfg.max_queue_delay_us, 0),
                               ("--max-queue-size", cfg.max_queue_size, 0), ("--encoder-instances", cfg.encoder_instances, 1),
                               ("--classifier-instances", cfg.classifier_instances, 1)):
        if value < least:
            raise BadSetting(f"{flag} must be at least {least}, got {value}")
    return configs.Throughput(cfg.encoder_instances, sizes, cfg.max_queue_delay_us, cfg.max_queue_size)


def check_runtime_unchanged(repo: Path, runtime_name: str, encoders_in_classifier: bool) -> None:
    """An export never changes how already-served versions run: `version_policy: all` keeps every encoder
    version loaded under the model's one config, so another runtime is refused (use another repository); and the
    classifier's one config says for all its versions whether their encoders run in its process or behind BLS calls,
    so moving them either way is refused too."""
    for name in contract.ENCODERS:
        if (repo / name / versions.CONFIG_FILE).exists():
            current = configs.runtime_of(versions.read_model_config(repo, name))
            if current != runtime_name:
                raise BadSetting(f"--runtime {runtime_name}: {name} versions {versions.versions(repo, name)} in {repo} run {current}; "
                                 f"an export with another runtime would change how they run. Export into another --repo")
    if versions.versions(repo, contract.CLASSIFIER):
        in_process = versions.encoders_in_classifier(repo)
        if in_process != encoders_in_classifier:
            where = ("in its own process (--encoders-in-classifier)", "through BLS calls to the encoder models")
            raise BadSetting(f"{'--encoders-in-classifier' if encoders_in_classifier else 'an export without --encoders-in-classifier'}: "
                             f"{contract.CLASSIFIER} versions {versions.versions(repo, contract.CLASSIFIER)} in {repo} run their encoders "
                             f"{where[not in_process]}; this export would move them {where[in_process]}, changing how the served "
                             f"versions run. Export {'without' if encoders_in_classifier else 'with'} the flag, or into another --repo")


def check_version_free(repo: Path, version: int) -> None:
    """--version N names one version of every model: refused before any work when one of them has it, so a
    refused export leaves no encoder versions behind."""
    taken = [m for m in (contract.CLASSIFIER,) + contract.ENCODERS if version and (repo / m / str(version)).exists()]
    if taken:
        raise BadSetting(f"--version {version}: {', '.join(taken)} in {repo} already have it (versions are immutable): "
                         f"pick a version none of {', '.join((contract.CLASSIFIER,) + contract.ENCODERS)} has, or leave --version out")


def _write_encoder(repo: Path, name: str, onnx_path: Path, tokenizer: Path, cfg: ExportConfig, dim: int, plain: bool,
                   save_weights=None) -> int:
    """plain: model.onnx is plain fp32 ONNX, which TensorRT can parse: trtexec's shape profiles go next to it."""
    # max_batch_size: the most rows the classifier sends in one BLS call (embed/score batch)
    max_batch, _ = configs.ENCODER_LIMITS[name]
    with new_version(repo, name, cfg.version) as (vdir, v):  # renamed into place only when complete
        if configs.runtime(cfg.runtime).torch_weights:  # the runtime serves these; model.onnx stays for the index and parity
            save_weights(str(vdir / TORCH_WEIGHTS_DIR))
        shutil.copy(onnx_path, vdir / MODEL_FILE)
        shutil.copy(tokenizer, vdir / TOKENIZER_FILE)
        (vdir / ENCODER_ID_FILE).write_text(weights_id(vdir / MODEL_FILE) + "\n")
        if plain:  # docker/build_tensorrt.sh builds model.plan from these two
            (vdir / TRTEXEC_SHAPES_FILE).write_text(configs.trtexec_shapes(name))
        adapter = configs.runtime(cfg.runtime).adapter
        if adapter:  # a runtime that serves model.onnx through a Python-backend adapter
            shutil.copy(ADAPTERS_DIR / adapter, vdir / ADAPTER_FILE)
    (repo / name / versions.CONFIG_FILE).write_text(configs.encoder_config(name, dim, cfg.runtime, max_batch, gpu=cfg.gpu,
                                                                           throughput=encoder_throughput(cfg)))
    (repo / name / TENSORRT_CONFIG).parent.mkdir(exist_ok=True)
    (repo / name / TENSORRT_CONFIG).write_text(
        configs.encoder_config(name, dim, TENSORRT, max_batch, gpu=True, throughput=encoder_throughput(cfg)))
    return v


def serving_params(cfg: ExportConfig, folder: RunFolder, n_labels: int) -> tuple:
    """(top_k, threshold) the new classifier version serves by default, checked by the rule TwoStageClassifier loads its
    pipeline.json by (pipeline.check_params): a flag it would refuse is a BadSetting naming it, before any work, not a
    version Triton cannot load. --top-k 0 = the K the run was evaluated with; a K above the taxonomy's size is cut to it."""
    from training.config import TrainConfig

    run_k = TrainConfig.load(folder.config).k_eval if folder.config.exists() else None  # a broken config.json: a BadSetting
    top_k = min(cfg.top_k or run_k or DEFAULTS.top_k, n_labels)
    top_k_source = f"--top-k {cfg.top_k}" if cfg.top_k else f"--top-k 0 (the run's k_eval, {run_k})"
    # one flag at a time, so that the message names the one at fault
    for source, threshold in ((top_k_source, DEFAULTS.threshold), (f"--threshold {cfg.threshold}", cfg.threshold)):
        try:
            checked = check_params(top_k, threshold, n_labels)
        except BadParameter as e:
            raise BadSetting(f"{source}: {e}") from None
    return checked


def onnx_embed(encoders, tok, texts: list, batch: int = DEFAULTS.embed_batch):
    """(n, dim) embeddings by an Encoders' bi-encoder, tokenised as the classifier tokenises unsplit text."""
    import numpy as np

    out = []
    for s in range(0, len(texts), batch):
        ids, mask, _ = tensors(tok.encode_batch(texts[s:s + batch]))
        out.append(encoders.embed(ids, mask))
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def label_index_from_onnx(onnx_path: Path, tokenizer: Path, source: LabelIndex) -> LabelIndex:
    """Embed the label texts and every exemplar with the exported graph itself, so the index matches
    the served encoder; scoring rule and label cards are kept."""
    tok = load_tokenizer(tokenizer, DEFAULTS.max_email_tokens)
    graph = OnnxEncoders(onnx_path)
    xb = onnx_embed(graph, tok, source.taxonomy.texts)
    xe = onnx_embed(graph, tok, source.exemplar_texts) if source.exemplar_index is not None else None
    return LabelIndex.build(source.taxonomy, xb, weights_id(onnx_path), xe, source.exemplar_labels, source.exemplar_texts,
                            source.scoring, source.cards, source.card_spec)


def int8_accuracy_change(run: Path, source: LabelIndex, fp32: tuple, int8: tuple, bi_tok, cross_tok, n: int, top_k: int,
                         flat_head: FlatHead = None) -> dict:
    """Accuracy of the fp32 and int8 graphs through the same pipeline, on the run's own test emails, each
    with the label index rebuilt from its own bi-encoder graph and the K that is shipped: what it measures
    is what serves. fp32, int8: (bi-encoder, cross-encoder, flat encoder or None) graphs."""
    from mailroute.pipeline import TwoStageClassifier
    from training.config import TrainConfig
    from training.data import limit, splits_of

    test = limit(splits_of(TrainConfig.load(RunFolder(run).config))[3], n, DEFAULTS.seed)  # the run's own test emails, as train read them
    out = {"emails": len(test), "top_k": top_k}
    for name, (b, c, f) in (("fp32", fp32), ("int8", int8)):
        index = label_index_from_onnx(b, bi_tok, source)
        clf = TwoStageClassifier(OnnxEncoders(b, c, flat_path=f), index, load_tokenizer(bi_tok, DEFAULTS.max_email_tokens),
                                 load_tokenizer(cross_tok, DEFAULTS.max_pair_tokens), top_k=top_k, policy=load_policy(run),
                                 flat_head=flat_head if f is not None else None)
        preds = [p for s in range(0, len(test), EVAL_BATCH)
                 for p in clf.classify_texts([e.text for e in test[s:s + EVAL_BATCH]], [""] * len(test[s:s + EVAL_BATCH]))]
        out[f"{name}_accuracy"] = sum(p.label == e.label for p, e in zip(preds, test)) / len(test)
    out["accuracy_change"] = out["int8_accuracy"] - out["fp32_accuracy"]
    return out


def _flat_of(folder: RunFolder, index: LabelIndex) -> tuple:
    """The run's flat classifier (training.reference.load_flat: checked against the labels, its weights and the
    bi-encoder's tokenizer), refused where the run's policy fuses one it did not keep."""
    flat = load_flat(folder.root, index.taxonomy.names)
    if flat is None:
        raise FileNotFoundError(f"{folder.policy} fuses the flat classifier, but {folder.root} has no {folder.flat_encoder.name}/ "
                                f"and {folder.flat_head.name}: train it again, or `mailroute baseline --run {folder.root}`")
    return flat


def export(cfg: ExportConfig) -> dict:
    run, repo = Path(cfg.run), Path(cfg.repo)
    if cfg.runtime not in configs.EXPORT_RUNTIMES:  # settings are checked before any work
        raise BadSetting(f"--runtime must be one of {configs.EXPORT_RUNTIMES}, got {cfg.runtime!r}")
    if cfg.encoders_in_classifier and not configs.runtime(cfg.runtime).torch_weights:
        with_weights = " or ".join(name for name in configs.EXPORT_RUNTIMES if configs.runtime(name).torch_weights)
        raise BadSetting(f"--encoders-in-classifier runs the encoders' PyTorch weights inside the classifier: it needs --runtime "
                         f"{with_weights}, got {cfg.runtime!r}")
    if cfg.quantize and configs.runtime(cfg.runtime).torch_weights:
        raise BadSetting(f"--quantize makes int8 ONNX graphs, which the {cfg.runtime} runtime does not run: leave one out")
    for flag, value in (("--version", cfg.version), ("--quantize-eval", cfg.quantize_eval)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BadSetting(f"{flag} must be a whole number >= 0, got {value!r} "
                             + ("(0 = the next free version)" if flag == "--version" else "(0 = every test email)"))
    check_runtime_unchanged(repo, cfg.runtime, cfg.encoders_in_classifier)
    check_version_free(repo, cfg.version)
    encoder_throughput(cfg)
    folder = RunFolder(run)
    if not folder.is_trained():
        needs = ", ".join(f"{p.name}/" for p in (folder.bi_encoder, folder.cross_encoder, folder.label_index))
        raise FileNotFoundError(f"{run} is not a trained run (needs {needs}): run `mailroute train` first")
    if not folder.policy.exists():  # written last, after the evaluation: a run without it stopped part way
        raise FileNotFoundError(f"{run} has no {folder.policy.name}: its training stopped before the rerank policy was fitted "
                                f"on validation, and serving it would drop the fitted fusion, temperature and gate; train it "
                                f"again (or `mailroute refit --run {run}` where its {folder.metrics.name} exists)")
    policy = load_policy(run)  # before any work: a broken policy file is named in a second, not after the ONNX export
    old = LabelIndex.load(folder.label_index)
    top_k, threshold = serving_params(cfg, folder, len(old.taxonomy))
    repo.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mailroute-export-"))
    try:
        return _export(cfg, run, repo, folder, work, old, policy, top_k, threshold)
    finally:  # the scratch folder goes, whether the export succeeded or not
        shutil.rmtree(work, ignore_errors=True)


def _export(cfg: ExportConfig, run: Path, repo: Path, folder: RunFolder, work: Path, old: LabelIndex, policy: RerankPolicy,
            top_k: int, threshold: float) -> dict:
    report = {"run": str(run), "runtime": cfg.runtime, "quantize": cfg.quantize}

    # 1. ONNX graphs with the contract's names, parity-checked against PyTorch; fused only for runtimes that run fused ops
    t = time.perf_counter()
    fuse = not cfg.no_optimize and configs.runtime(cfg.runtime).fused_graph
    bi_model, cross_model = load_bi_encoder(folder.bi_encoder), load_cross_encoder(folder.cross_encoder)
    bi_tok, cross_tok = folder.bi_encoder / TOKENIZER_FILE, folder.cross_encoder / TOKENIZER_FILE
    flat_model = flat_head = None
    if policy.uses_flat:  # the flat classifier is served with the version whose policy fuses it
        flat_model, flat_head = _flat_of(folder, old)
    texts = PARITY_TEXTS + old.taxonomy.texts[:8]
    report["parity_max_abs_diff"] = {
        contract.BI_ENCODER: export_bi_encoder(bi_model, bi_tok, work / "bi.onnx", texts, optimize=fuse),
        contract.CROSS_ENCODER: export_cross_encoder(cross_model, cross_tok, work / "cross.onnx",
                                                     [(t, l) for t in PARITY_TEXTS for l in old.taxonomy.texts[:3]], optimize=fuse),
    }
    if flat_model is not None:
        report["parity_max_abs_diff"][contract.FLAT_ENCODER] = export_bi_encoder(flat_model, bi_tok, work / "flat.onnx", texts,
                                                                                 optimize=fuse, name=contract.FLAT_ENCODER)
    print(f"[1/3] ONNX export, parity vs PyTorch (max abs diff): {report['parity_max_abs_diff']}")
    bi_path, cross_path = work / "bi.onnx", work / "cross.onnx"
    flat_path = work / "flat.onnx" if flat_model is not None else None
    if cfg.quantize:
        for p in (bi_path, cross_path, flat_path):
            if p is not None:
                quantize_int8(p, p.with_suffix(".int8.onnx"))
        int8 = tuple(None if p is None else p.with_suffix(".int8.onnx") for p in (bi_path, cross_path, flat_path))
        report["int8"] = int8_accuracy_change(run, old, (bi_path, cross_path, flat_path), int8, bi_tok, cross_tok, cfg.quantize_eval, top_k,
                                              flat_head)
        print(f"[1/3] int8 quantisation: {report['int8']}")
        bi_path, cross_path, flat_path = int8

    # 2. encoder versions (+ configs); the label index rebuilt with the exported bi-encoder
    dim, plain = int(old.manifest["dim"]), not fuse and not cfg.quantize  # TensorRT parses neither fused nor int8 graphs
    bi_v = _write_encoder(repo, contract.BI_ENCODER, bi_path, bi_tok, cfg, dim, plain, save_weights=bi_model[0].auto_model.save_pretrained)
    # the cross-encoder's whole folder (weights + tokenizer): continued training loads it as a CrossEncoder
    cross_v = _write_encoder(repo, contract.CROSS_ENCODER, cross_path, cross_tok, cfg, dim, plain, save_weights=cross_model.save)
    bi_dir = repo / contract.BI_ENCODER / str(bi_v)
    index = label_index_from_onnx(bi_dir / MODEL_FILE, bi_dir / TOKENIZER_FILE, old)
    flat_v = None
    if flat_model is not None:  # the head pinned to the exported graph, as the index is to the bi-encoder's
        flat_v = _write_encoder(repo, contract.FLAT_ENCODER, flat_path, bi_tok, cfg, dim, plain,
                                save_weights=flat_model[0].auto_model.save_pretrained)
        flat_head = flat_head.with_encoder(weights_id(repo / contract.FLAT_ENCODER / str(flat_v) / MODEL_FILE))
    print(f"[2/3] encoder versions: {contract.BI_ENCODER} v{bi_v}, {contract.CROSS_ENCODER} v{cross_v}"
          + (f", {contract.FLAT_ENCODER} v{flat_v}" if flat_v else "") + f"; label index rebuilt with the exported {contract.BI_ENCODER}")

    # 3. the classifier version that pins them
    with new_version(repo, contract.CLASSIFIER, cfg.version) as (cdir, cv):
        index.save(cdir / LABEL_INDEX_DIR)
        if flat_head is not None:
            flat_head.save(cdir / FLAT_HEAD_FILE)
        shutil.copy(ADAPTERS_DIR / CLASSIFIER_ADAPTER, cdir / ADAPTER_FILE)
        without_flat = RerankPolicy.load(folder.policy_without_flat).to_dict() if flat_v and folder.policy_without_flat.exists() else None
        write_pipeline(cdir, PipelineSpec(bi_v, cross_v, top_k, threshold, policy.to_dict(), kind="export", created=utc_stamp(),
                                          source_run=str(run.resolve()), quantized=cfg.quantize, flat_encoder_version=flat_v,
                                          policy_without_flat=without_flat))
    cdir = repo / contract.CLASSIFIER / str(cv)
    previous = max([v for v in versions.versions(repo, contract.CLASSIFIER) if v != cv], default=None)
    if (repo / contract.CLASSIFIER / versions.CONFIG_FILE).exists():
        previous = versions.serving_version(repo) or previous
    # the config keeps serving what it served; promote() then names the new version and logs the change
    search_device = configs.runtime(cfg.runtime).gpu_label_search if cfg.gpu else ""
    (repo / contract.CLASSIFIER / versions.CONFIG_FILE).write_text(
        configs.classifier_config(contract.CLASSIFIER_MAX_BATCH, cfg.classifier_instances, embed_batch=DEFAULTS.embed_batch,
                                  score_batch=DEFAULTS.score_batch, serving_version=previous or cv,
                                  throughput=configs.Throughput(cfg.classifier_instances, (), configs.CLASSIFIER_DELAY_FACTOR * cfg.max_queue_delay_us,
                                                                    cfg.max_queue_size),
                                  search_device=search_device, encoders_in_process=cfg.encoders_in_classifier, gpu=cfg.gpu))
    # a running server loads the new version with `mailroute versions promote`
    versions.promote(repo, cv, note=f"mailroute export of {run}")
    report |= {"versions": {contract.CLASSIFIER: cv, contract.BI_ENCODER: bi_v, contract.CROSS_ENCODER: cross_v}
               | ({contract.FLAT_ENCODER: flat_v} if flat_v else {}),
               "seconds": round(time.perf_counter() - t, 1), "config": asdict(cfg)}
    (cdir / EXPORT_REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    print(f"[3/3] {repo}: {contract.CLASSIFIER} v{cv} -> {contract.BI_ENCODER} v{bi_v}, {contract.CROSS_ENCODER} v{cross_v}"
          + (f", {contract.FLAT_ENCODER} v{flat_v}" if flat_v else ""))
    return report
