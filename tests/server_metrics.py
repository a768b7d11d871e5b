"""Reading a running tritonserver's Prometheus endpoint in tests: counters are compared before and after a request,
since the session's server has already served the tests before."""

import urllib.request


def metrics_text(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as r:
        return r.read().decode()


def metric_total(text: str, name: str, **labels) -> float:
    """Sum of the samples whose line starts with `name` and carries every label given (e.g. over versions)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total
