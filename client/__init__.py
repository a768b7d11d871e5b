"""Client side of mailroute: the typed gRPC client, the CLI, and the local Triton launcher."""

from client.classifier_client import AsyncClassifierClient, Classification, ClassifierClient, ClassifierError

__all__ = ["ClassifierClient", "AsyncClassifierClient", "Classification", "ClassifierError"]
