"""Triton gRPC vs in-process ONNX at a fixed concurrency: emails/s and p50/p99 per request.

    python -m benchmarks.triton_load --repo model_repository --concurrency 8 --seconds 30

Starts the real tritonserver on the repository (free ports), runs `concurrency` threads that each
send one email per request for `seconds`, then runs the in-process ONNX classifier on the same
emails in batches of `concurrency` (the largest batch the server can form from that many requests
in flight), and reports the overhead.
"""

import argparse
import json
import os
import platform
import sys
import threading
import time

from benchmarks.inputs import banking77_texts, email_texts, percentiles
from client import ClassifierClient
from client.server import TritonServer
from mailroute.repository import open_onnx_classifier
from mailroute.settings import DEFAULT_REPOSITORY, shown


def load(url: str, texts: list, concurrency: int, seconds: float, k: int) -> dict:
    lat, errors, stop = [], [], time.time() + seconds

    def worker(i):
        with ClassifierClient(url, timeout=60) as c:
            j = i
            while time.time() < stop:
                t = time.perf_counter()
                try:
                    c.classify([texts[j % len(texts)]], top_k=k)
                    lat.append((time.perf_counter() - t) * 1e3)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    errors.append(str(e)[:80])
                j += concurrency

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.perf_counter() - t0
    if not lat:  # nothing to take percentiles of: the errors are the result
        sys.exit(f"triton_load: no request answered in {seconds:g} s ({len(errors)} failed), e.g. {sorted(set(errors))[:3]}")
    return {"emails_per_s": len(lat) / wall, "requests": len(lat), "errors": len(errors), "error_sample": sorted(set(errors))[:3]} | percentiles(lat)


def inprocess(clf, texts: list, batch: int, k: int, n: int) -> float:
    clf.classify(texts[:batch], top_k=k)
    t = time.perf_counter()
    for s in range(0, n, batch):
        clf.classify(texts[s:s + batch], top_k=k)
    return n / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=str(DEFAULT_REPOSITORY), help=f"model repository to serve (default: {shown(DEFAULT_REPOSITORY)})")
    ap.add_argument("--concurrency", type=int, default=8, help="client threads, one email per request each (default: 8)")
    ap.add_argument("--seconds", type=float, default=30, help="load time per email length (default: 30)")
    ap.add_argument("--k", type=int, default=10, help="candidates reranked per email, at most the taxonomy's labels (default: 10)")
    a = ap.parse_args()
    for flag, ok in (("--concurrency", a.concurrency >= 1), ("--seconds", a.seconds > 0), ("--k", a.k >= 1)):
        if not ok:
            ap.error(f"{flag} must be positive")
    results = {"command": "python -m benchmarks.triton_load " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d %H:%M"),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "k": a.k, "concurrency": a.concurrency}
    clf = open_onnx_classifier(a.repo)
    for name, texts in (("banking77_length", banking77_texts(512)), ("email_200_words", email_texts(512))):
        print(f"{name}: {a.concurrency} clients for {a.seconds:g} s ...", flush=True)
        with TritonServer(a.repo) as server:
            served = load(server.grpc_url, texts, a.concurrency, a.seconds, a.k)
        # the in-process baseline at the batch size concurrency allows (the server batches up to that)
        local = inprocess(clf, texts, a.concurrency, a.k, min(len(texts), max(64, int(served["emails_per_s"] * 10))))
        served["inprocess_onnx_emails_per_s"] = local
        served["overhead"] = 1 - served["emails_per_s"] / local
        results[name] = served
        print(f"{name}: Triton {served['emails_per_s']:.1f} emails/s (p50 {served['p50_ms']:.0f} ms, p99 {served['p99_ms']:.0f} ms, "
              f"{served['errors']} errors), in-process ONNX {local:.1f} emails/s, overhead {served['overhead']:.1%}", flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    from client.server import ServerStartError

    try:
        main()
    except ServerStartError as e:  # a wrong --repo, a port in use: one line (after the server log's tail, where it has one)
        sys.exit((f"{e.log_tail}\n" if e.log_tail else "") + f"triton_load: {e.summary}")
    except FileNotFoundError as e:  # no classifier in --repo (the in-process baseline opens it first)
        sys.exit(f"triton_load: {e}")
