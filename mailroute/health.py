"""The canary: one classification through `email_classifier`, over Triton's HTTP/JSON API with the
standard library (and numpy, through the tensor contract it reads names from), so the same check runs in the
launcher's watchdog, in the production image's health check and by hand:

    python -m mailroute.health http://localhost:8000      # exit 0 = the pipeline answered, 1 = it did not

Triton's /v2/health/ready only says the process answers: it stays 200 when a backend process died.
"""

import json
import sys
import urllib.error
import urllib.request

from mailroute import contract

CANARY_TIMEOUT_S = 10.0  # one canary classification; past it the server counts as not ready
CANARY = "Hello, I was charged twice for my subscription this month, please refund the extra charge."


def canary(http_url: str, timeout: float = CANARY_TIMEOUT_S) -> tuple:
    """-> (ok, error message): ok when the classifier returned a label for the canary email."""
    body = {"inputs": [{"name": contract.TEXT, "shape": [1, 1], "datatype": contract.TENSORS[contract.TEXT].wire_type, "data": [CANARY]}],
            "outputs": [{"name": contract.LABEL}, {"name": contract.ERROR}]}
    req = urllib.request.Request(f"{http_url.rstrip('/')}/v2/models/{contract.CLASSIFIER}/infer", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out = {o["name"]: o["data"][0] for o in json.loads(r.read())["outputs"]}
    except urllib.error.HTTPError as e:
        return False, f"HTTP {e.code}: {e.read().decode(errors='replace')[:500]}"
    except (OSError, ValueError, KeyError) as e:
        return False, f"{type(e).__name__}: {e}"
    if out.get(contract.ERROR) or not out.get(contract.LABEL):
        return False, f"canary row error: {out.get(contract.ERROR)!r}"
    return True, ""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 2
    ok, err = canary(argv[0])
    print("ok: the pipeline classified the canary email" if ok else f"not ready: {err}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
