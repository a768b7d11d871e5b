"""Honest readiness and recovery for a running mailroute Triton server.

Triton's own /v2/health/ready keeps answering 200 after a Python-backend stub process dies, while
every classification fails with "Stub process '<model>_0_0' is not healthy" (measured on the 2.51
binary). So readiness here is proven: a canary classification through `email_classifier`, repeated
every `interval` seconds; the server is ready while the last canary passed less than `max_age` ago
(by default 3 intervals, and never under 6 s: one late or failed canary alone does not turn it 503).

Recovery, measured by hand on the 2.51 binary with the tiny test models (2026-11-26; tests/test_operations.py
checks the behaviour, benchmarks/soak.py the loaded case):
  - a repository `load` of a loaded model with an unchanged config is a no-op (0.002 s): the dead
    stub stays dead;
  - a `load` with a config override that differs (a `reload_nonce` parameter) replaces the model's
    instances with fresh stubs: the pipeline answered again 1.5 s after the reload began;
  - but under load (a soak at 70% of maximum throughput) the same reload crashed tritonserver 2.51
    (signal 11) once; the watchdog then restarts the server at once (its full start time, ~3 s for
    the tiny test models), and the client's retries carry requests over the gap.
So the watchdog reloads the models named in the failure (all of them when it cannot tell), gives the
reload `grace` seconds to bring the canary back (a loaded server answers slowly while it catches up),
and restarts the server only when a reload fails or `restart_after` reloads in a row did not help.
"""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mailroute import contract
from mailroute.health import CANARY_TIMEOUT_S, canary
from mailroute.settings import CANARY_INTERVAL_S, BadSetting

_UNHEALTHY = re.compile(r"Stub process '(\w+?)_\d+_\d+' is not healthy")


MAX_AGE_INTERVALS = 3  # default max_age = this many canary intervals
MIN_MAX_AGE = MAX_AGE_INTERVALS * CANARY_INTERVAL_S  # seconds: the least default max_age (at the default interval)


def default_max_age(interval: float) -> float:
    """How long a passed canary keeps the server ready when max_age is not given: 3 intervals, at least 6 s. A
    fixed age below the interval would turn readiness 503 between two canaries on a healthy server."""
    return max(MIN_MAX_AGE, MAX_AGE_INTERVALS * interval)


class Watchdog:
    """Canary readiness plus self-repair for one TritonServer (client.server.TritonServer).
    max_age None (default) = default_max_age(interval); a given value is kept as it is."""

    def __init__(self, server, interval: float = CANARY_INTERVAL_S, max_age: float = None, restart_after: int = 2,
                 timeout: float = CANARY_TIMEOUT_S,
                 grace: float = 15.0):
        if not interval > 0:  # 0 would run canaries back to back, a negative wait raises deep in threading
            raise BadSetting(f"--canary-interval must be a number of seconds > 0, got {interval!r}")
        max_age = default_max_age(interval) if max_age is None else max_age
        self.server, self.interval, self.max_age, self.restart_after, self.timeout = server, interval, max_age, restart_after, timeout
        self.grace = grace
        self.last_ok = 0.0
        self.failures = 0  # consecutive failed canaries
        self.repairs = 0  # repairs since the canary last passed
        self._last_repair = 0.0
        self.events = []  # what was repaired, when, and how long until the canary passed again
        self._down_since = None
        self._stop = threading.Event()
        self._thread = None
        self._lock = threading.Lock()

    # readiness
    def canary(self) -> tuple:
        """One classification through the whole pipeline -> (ok, error message)."""
        return canary(self.server.http_url, self.timeout)

    @property
    def ready(self) -> bool:
        return time.time() - self.last_ok < self.max_age

    def status(self) -> dict:
        return {"ready": self.ready, "last_ok_age_s": round(time.time() - self.last_ok, 2) if self.last_ok else None,
                "consecutive_failures": self.failures, "recoveries": self.events[-10:]}

    # repair
    def _admin_client(self):
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(self.server.grpc_url), {contract.ADMIN_HEADER: self.server.admin_key} if self.server.admin_key else None

    def reload(self, models) -> None:
        """Reload models with fresh backend processes: a config override with a new nonce forces it."""
        c, headers = self._admin_client()
        for m in models:
            cfg = c.get_model_config(m, as_json=True, headers=headers)["config"]
            cfg.setdefault("parameters", {})["reload_nonce"] = {"string_value": f"{time.time():.6f}"}
            c.load_model(m, config=json.dumps(cfg), headers=headers)
        c.close()

    def repair(self, error: str) -> str:
        """-> what was done ("" = nothing: the last repair is still within its grace period)."""
        if self.server.proc is None or self.server.proc.poll() is not None:  # the server itself died: at once
            self.repairs, self._last_repair = self.restart_after + 1, time.time()
            self.server.restart()
            return "restart (server process had exited)"
        if self.repairs and time.time() - self._last_repair < self.grace:
            return ""
        self.repairs += 1
        self._last_repair = time.time()
        dead = sorted(set(_UNHEALTHY.findall(error)))
        models = [m for m in dead if m in self.server.models] or list(self.server.models)
        if self.repairs > self.restart_after:
            self.server.restart()
            return "restart"
        try:
            self.reload(models)
            return "reload " + ",".join(models)
        except Exception as e:  # the server itself is unwell: the next repair restarts it
            self.repairs = self.restart_after
            return f"reload failed: {e}"

    def check_once(self) -> bool:
        ok, err = self.canary()
        with self._lock:
            if ok:
                if self._down_since is not None and self.events:
                    self.events[-1]["recovered_after_s"] = round(time.time() - self._down_since, 2)
                self.last_ok, self.failures, self.repairs, self._down_since = time.time(), 0, 0, None
                return True
            self.failures += 1
            if self._down_since is None:
                self._down_since = time.time()
            try:
                action = self.repair(err)
            except Exception as e:  # never let the watchdog thread die: try again next round
                action = f"repair failed: {e}"
            if action:
                self.events.append({"at": time.strftime("%H:%M:%S"), "error": err[:200], "action": action})
            return False

    # thread
    def start(self) -> "Watchdog":
        self.check_once()
        self._thread = threading.Thread(target=self._loop, name="mailroute-watchdog", daemon=True)
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(self.interval):
            self.check_once()

    def stop(self):
        self._stop.set()
        if self._thread:
            self._thread.join(self.timeout + self.interval)


class ReadinessServer:
    """GET /ready -> 200 while the watchdog's canary passes, else 503 (JSON body either way);
    GET /live -> 200 while the server process runs. For load balancers in front of `mailroute serve` (the compose
    services run tritonserver directly and check health with `python -m mailroute.health` instead)."""

    def __init__(self, watchdog: Watchdog, port: int, host: str = "0.0.0.0"):
        wd = watchdog

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.rstrip("/") == "/ready":
                    code, body = (200 if wd.ready else 503), wd.status()
                elif self.path.rstrip("/") == "/live":
                    alive = wd.server.proc is not None and wd.server.proc.poll() is None
                    code, body = (200 if alive else 503), {"live": alive}
                else:
                    code, body = 404, {"error": f"unknown path {self.path!r}: use /ready or /live"}
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # no line per health probe
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="mailroute-readiness", daemon=True)

    def start(self) -> "ReadinessServer":
        self._thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
