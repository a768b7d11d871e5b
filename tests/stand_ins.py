"""Stand-ins for launcher tests that must not start tritonserver: a command in its place and an empty repository the
launcher accepts."""

import os

from client.server import TritonServer
from mailroute import contract


def launch_instead(monkeypatch, command: list, check_repository: bool = False) -> None:
    """TritonServer launches `command` instead of tritonserver (no backend copy, no stub venv); with
    check_repository=False the repository check is skipped too (no model repository behind the stand-in)."""
    monkeypatch.setattr(TritonServer, "command", lambda self: list(command))
    monkeypatch.setattr(TritonServer, "env", lambda self: dict(os.environ))
    if not check_repository:
        monkeypatch.setattr(TritonServer, "check_repository", lambda self: None)


def empty_repository(folder, version: str = None):
    """A folder per mailroute model (with an empty `version` folder in each when given): what the launcher accepts."""
    for m in contract.MODELS:
        (folder / m / (version or "")).mkdir(parents=True)
    return folder
