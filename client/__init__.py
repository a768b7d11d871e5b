"""Client side of mailroute: the typed gRPC client (and the CLI's input reading), the local Triton launcher and its
watchdog (canary readiness and self-repair). The CLI itself is mailroute/cli.py."""

from client.classifier_client import AsyncClassifierClient, Classification, ClassifierClient, ClassifierError

__all__ = ["ClassifierClient", "AsyncClassifierClient", "Classification", "ClassifierError"]
