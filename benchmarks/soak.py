"""Soak: a steady load at a share of the measured maximum throughput, with a backend crash mid-run
(a script, not a CI test; it only talks to the server it starts on 127.0.0.1).

    python -m benchmarks.soak --repo model_repository --minutes 10 --load 0.7 --kill-at 300

1. starts the real tritonserver on the repository (free ports) with the launcher's watchdog;
2. measures the maximum throughput (closed loop, `--max-concurrency` clients, one email per request);
3. sends `--load` x that rate, open loop (fixed arrival times), for `--minutes`: mostly BANKING77-length
   emails, one in ten a bad one (empty, not UTF-8) that must come back as a row error;
4. at `--kill-at` seconds kills the cross_encoder backend process (SIGKILL); the watchdog reloads it (or restarts the server
   when the stub took it down, as it did under load in both recorded soaks) and the client's retries carry the requests of the gap;
5. samples the server's memory (tritonserver + its backend processes) every 10 s.
Reports unexpected errors, lost requests, RSS growth, p50/p99 per minute (first vs last), the recovery
time, and writes benchmarks/results/soak.json.
"""

import argparse
import json
import os
import platform
import sys
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil

from benchmarks.inputs import banking77_texts
from client import ClassifierClient
from client.server import TritonServer
from client.watchdog import Watchdog
from mailroute import contract
from mailroute.settings import DEFAULT_REPOSITORY, ROOT, shown

BAD = [("", "empty"), (b"\xff\xfe\xfa", "not UTF-8")]


def _shown(path) -> str:
    """A path as the raw output records it: relative to the checkout when inside it (no machine path in results)."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(path)


def server_rss_mb(server: TritonServer) -> float:
    total = 0
    try:
        p = psutil.Process(server.proc.pid)
        procs = [p] + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return float("nan")
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:  # a backend process being replaced
            pass
    return total / 2**20


def max_throughput(url: str, texts: list, concurrency: int, seconds: float) -> float:
    done, stop = [0], time.time() + seconds

    def worker(i):
        with ClassifierClient(url, timeout=60) as c:
            j = i
            while time.time() < stop:
                c.classify([texts[j % len(texts)]])
                done[0] += 1
                j += concurrency

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return done[0] / (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=str(DEFAULT_REPOSITORY), help=f"model repository to serve (default: {shown(DEFAULT_REPOSITORY)})")
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the soak (default: 10)")
    ap.add_argument("--load", type=float, default=0.7, help="share of the measured maximum throughput (default 0.7)")
    ap.add_argument("--kill-at", type=float, default=300.0, help="seconds into the soak to kill the cross_encoder stub; <0 = never (default: 300)")
    ap.add_argument("--max-concurrency", type=int, default=8, help="closed-loop clients of the maximum-throughput measurement (default: 8)")
    ap.add_argument("--max-seconds", type=float, default=30.0, help="seconds of the maximum-throughput measurement (default: 30)")
    ap.add_argument("--out", default="benchmarks/results/soak.json", help="summary JSON to write (default: benchmarks/results/soak.json)")
    a = ap.parse_args(argv)

    texts = banking77_texts(2000, seed=1)
    with TritonServer(a.repo, admin_key="soak-key") as server:
        wd = Watchdog(server, interval=1.0, max_age=3.0).start()
        peak = max_throughput(server.grpc_url, texts, a.max_concurrency, a.max_seconds)
        rate = a.load * peak
        print(f"maximum throughput {peak:.2f} emails/s at concurrency {a.max_concurrency}; soak at {rate:.2f}/s for {a.minutes:g} min")
        records, rss = [], []
        lock = threading.Lock()
        client = ClassifierClient(server.grpc_url, timeout=60)  # grpc clients are thread-safe; default retries
        rss0 = server_rss_mb(server)
        duration = a.minutes * 60
        killed_at = [None]

        def one(i: int, scheduled: float):
            bad = i % 10 == 9
            text, _ = BAD[(i // 10) % 2] if bad else (texts[i % len(texts)], "")  # the bad kinds in turn
            t = time.perf_counter()
            try:
                r = client.classify([text])[0]
                outcome = ("expected_row_error" if not r.ok else "unexpected_label") if bad else ("ok" if r.ok else "unexpected_row_error")
                err = r.error
            except Exception as e:  # noqa: BLE001 - an error the caller would see: counted and reported
                outcome, err = "error", str(e)[:200]
            with lock:
                records.append({"t": scheduled, "ms": (time.perf_counter() - t) * 1e3, "outcome": outcome, "error": err})

        def sample_rss():
            while time.time() - start < duration:
                rss.append((time.time() - start, server_rss_mb(server)))
                time.sleep(10)

        def killer():
            if a.kill_at < 0:
                return
            time.sleep(a.kill_at)
            os.kill(server.stub_pid(contract.CROSS_ENCODER), signal.SIGKILL)
            killed_at[0] = time.time() - start
            print(f"killed the {contract.CROSS_ENCODER} stub at {killed_at[0]:.0f} s")

        start = time.time()
        threading.Thread(target=sample_rss, daemon=True).start()
        threading.Thread(target=killer, daemon=True).start()
        n = int(duration * rate)
        with ThreadPoolExecutor(max_workers=64) as pool:
            for i in range(n):
                due = start + i / rate
                time.sleep(max(0.0, due - time.time()))
                pool.submit(one, i, due - start)
                if i and i % max(1, int(60 * rate)) == 0:  # a line a minute: a 10-minute run is not silent
                    with lock:
                        errs = sum(r["outcome"] not in ("ok", "expected_row_error") for r in records)
                    print(f"  {time.time() - start:4.0f} s: {i} sent, {len(records)} answered, {errs} unexpected", flush=True)
        rss.append((time.time() - start, server_rss_mb(server)))
        client.close()
        wd.stop()
        events = wd.events

    # summary
    outcomes = {k: sum(r["outcome"] == k for r in records) for k in ("ok", "expected_row_error", "error", "unexpected_row_error", "unexpected_label")}
    minute = lambda m: [r["ms"] for r in records if m * 60 <= r["t"] < (m + 1) * 60 and r["outcome"] == "ok"]  # noqa: E731
    per_minute = []
    for m in range(int(np.ceil(a.minutes))):
        ms = minute(m)
        if ms:
            per_minute.append({"minute": m + 1, "n": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))})
    recovery = next((e.get("recovered_after_s") for e in events if "recovered_after_s" in e), None)
    summary = {
        "command": "python -m benchmarks.soak " + " ".join(argv if argv is not None else os.sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "repo": _shown(a.repo), "max_emails_per_s": peak, "rate_emails_per_s": rate, "requests_sent": n, "requests_answered": len(records),
        "lost": n - len(records), "outcomes": outcomes, "unexpected_errors": outcomes["error"] + outcomes["unexpected_row_error"] + outcomes["unexpected_label"],
        "rss_mb_start": rss0, "rss_mb_end": rss[-1][1], "rss_growth": rss[-1][1] / rss0 - 1, "rss_mb_samples": rss,
        "per_minute": per_minute, "killed_at_s": killed_at[0], "watchdog_events": events, "recovered_after_s": recovery,
        "errors_sample": [r["error"] for r in records if r["outcome"] == "error"][:5],
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nsent {n}, answered {len(records)}, outcomes {outcomes}")
    print(f"server RSS {rss0:.0f} MB -> {rss[-1][1]:.0f} MB ({100 * summary['rss_growth']:+.1f}%)")
    print("| minute | emails | p50 ms | p99 ms |\n| --- | --- | --- | --- |")
    for m in per_minute:
        print(f"| {m['minute']} | {m['n']} | {m['p50_ms']:.0f} | {m['p99_ms']:.0f} |")
    print(f"stub killed at {killed_at[0]} s; recovered after {recovery} s; watchdog: {events}")
    print(f"saved {a.out}")
    return summary


if __name__ == "__main__":
    from client.server import ServerStartError

    try:
        main()
    except ServerStartError as e:  # a wrong --repo, a port in use: one line (after the server log's tail, where it has one)
        sys.exit((f"{e.log_tail}\n" if e.log_tail else "") + f"soak: {e.summary}")
