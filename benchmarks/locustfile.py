"""Locust load test of the email_classifier over gRPC, with an SLA check.

    locust -f benchmarks/locustfile.py --headless -u 8 -r 8 -t 60s --host 127.0.0.1:8001 \
        --csv runs/locust --sla-p99-ms 1000 --sla-rps 20

The host is the gRPC address. Length of the emails: MAILROUTE_BENCH_TEXTS=banking77|email (default email).
At the end the run fails (exit code 1) when the p99 latency or the throughput misses the SLA.
"""

import os
import random

from locust import between, events, task

from benchmarks.grpc_user import ClassifierUser
from benchmarks.inputs import banking77_texts, email_texts

TEXTS = banking77_texts(512) if os.environ.get("MAILROUTE_BENCH_TEXTS") == "banking77" else email_texts(512)


@events.init_command_line_parser.add_listener
def _(parser):
    parser.add_argument("--sla-p99-ms", type=float, default=1000.0, help="fail the run if p99 latency is above this")
    parser.add_argument("--sla-rps", type=float, default=0.0, help="fail the run if requests/s is below this")


class EmailSender(ClassifierUser):
    wait_time = between(0, 0.01)

    @task
    def classify_one(self):
        self.classify([random.choice(TEXTS)], "classify 1 email")


@events.quitting.add_listener
def _(environment, **kw):
    stats, opts = environment.stats.total, environment.parsed_options
    p99, rps = stats.get_response_time_percentile(0.99), stats.total_rps
    # no request answered is no evidence: a run that could not reach the server misses the SLA
    ok = stats.num_requests > 0 and p99 <= opts.sla_p99_ms and rps >= opts.sla_rps and stats.num_failures == 0
    print(f"SLA {'met' if ok else 'MISSED'}: p99 {p99:.0f} ms (target {opts.sla_p99_ms:.0f}), {rps:.1f} req/s "
          f"(target {opts.sla_rps:.1f}), {stats.num_requests} requests, {stats.num_failures} failures")
    if not ok:
        environment.process_exit_code = 1
