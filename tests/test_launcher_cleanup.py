"""The server launcher leaves nothing behind when it fails to start, and the watchdog's readiness window follows
its canary interval. No tritonserver runs here: a Python process stands in for it, so these tests are quick."""

import os
import sys
from types import SimpleNamespace

import pytest

from client.server import TritonServer
from client.watchdog import Watchdog, default_max_age
from stand_ins import empty_repository, launch_instead


def _stand_in(monkeypatch, code: str):
    """TritonServer launches `python -c code` instead of tritonserver."""
    launch_instead(monkeypatch, [sys.executable, "-c", code])


def test_a_server_that_exits_at_start_leaves_no_temp_folder(monkeypatch, tmp_path):
    # Given a "server" that exits at once
    _stand_in(monkeypatch, "import sys; sys.exit(3)")
    server = TritonServer(tmp_path)
    assert server.work.is_dir()
    # When it is started as a context manager, the error reaches the caller
    with pytest.raises(RuntimeError, match="exited with 3"):
        with server:
            pytest.fail("the body must not run when the server did not start")
    # Then its temporary folder is gone
    assert not server.work.exists()


def test_a_server_that_never_gets_ready_is_stopped_and_leaves_no_temp_folder(monkeypatch, tmp_path):
    # Given a "server" that runs but never answers on its HTTP port, and a short start timeout
    _stand_in(monkeypatch, "import time; time.sleep(60)")
    start = TritonServer.start
    monkeypatch.setattr(TritonServer, "start", lambda self, timeout=180: start(self, timeout=1))
    server = TritonServer(tmp_path)
    # When it is started as a context manager
    with pytest.raises(TimeoutError, match="not ready"):
        with server:
            pass
    # Then its process was stopped and its temporary folder removed
    assert server.proc.poll() is not None
    assert not server.work.exists()


def test_a_start_that_cannot_launch_the_binary_leaves_no_temp_folder(monkeypatch, tmp_path):
    # Given a tritonserver path that does not exist
    launch_instead(monkeypatch, [str(tmp_path / "no-such-tritonserver")])
    server = TritonServer(tmp_path)
    with pytest.raises(FileNotFoundError):
        with server:
            pass
    assert not server.work.exists()


@pytest.mark.parametrize("interval, expected", [(0.5, 6.0), (2.0, 6.0), (10.0, 30.0)])
def test_watchdog_readiness_outlasts_its_canary_interval(interval, expected, monkeypatch):
    # Given a watchdog without a max_age: 3 canary intervals, never under 6 s
    wd = Watchdog(server=None, interval=interval)
    assert wd.max_age == expected == default_max_age(interval)
    # When the next canary is just late, after a passed one (a fixed 6 s turned a healthy server 503 for 4 s of every
    # 10 at a 10 s interval)
    wd.last_ok = 1000.0
    monkeypatch.setattr("client.watchdog.time", SimpleNamespace(time=lambda: wd.last_ok + interval + 0.1))
    # Then the server is still ready
    assert wd.ready


def test_a_given_max_age_decides_readiness(monkeypatch):
    # Given a watchdog told that a passed canary counts for 1.5 s (the default at this interval would be 6 s)
    wd = Watchdog(server=None, interval=0.5, max_age=1.5)
    wd.last_ok = 1000.0
    # Then it is ready 1.4 s after the canary passed and not at 1.6 s
    monkeypatch.setattr("client.watchdog.time", SimpleNamespace(time=lambda: wd.last_ok + 1.4))
    assert wd.ready
    monkeypatch.setattr("client.watchdog.time", SimpleNamespace(time=lambda: wd.last_ok + 1.6))
    assert not wd.ready


@pytest.mark.parametrize("interval", [0, -1.0])
def test_a_canary_interval_that_is_not_positive_is_refused(interval):
    from mailroute.settings import BadSetting

    with pytest.raises(BadSetting, match="--canary-interval must be a number of seconds > 0"):
        Watchdog(server=None, interval=interval)


def test_serve_refuses_ports_it_cannot_listen_on_before_starting_anything(tmp_path, capsys, monkeypatch):
    import socket

    from mailroute.cli import main

    empty_repository(tmp_path)  # a repository the launcher accepts; no server may start
    monkeypatch.setattr(TritonServer, "start", lambda self, timeout=0: pytest.fail("a server was started"))

    def fails(*flags):
        with pytest.raises(SystemExit) as e:
            main(["serve", "--repo", str(tmp_path), "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0", *flags])
        return str(e.value.code)

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        said = fails("--ready-port", str(port))
        assert f"readiness port {port} cannot be used" in said and "choose another with --ready-port" in said
    assert "gRPC port 70000 cannot be used (not a TCP port number, 0-65535): choose another with --grpc-port" in fails("--grpc-port", "70000")
    assert "--canary-interval must be a number of seconds > 0" in fails("--canary-interval", "0")
    assert "--ready-port must be a port, 0 for a free one or -1 for none, got -2" in fails("--ready-port", "-2")
    assert "--http-port and --ready-port are both 8765" in fails("--http-port", "8765", "--ready-port", "8765")


def test_every_start_refuses_a_wrong_repository_before_launching(monkeypatch, tmp_path):
    """Benchmarks and the demo start servers as context managers, not through `mailroute serve`: a wrong repository is
    refused by name there too, and nothing is launched."""
    from client.server import ServerStartError

    launched = []
    monkeypatch.setattr("client.server.subprocess.Popen", lambda *a, **k: launched.append(a))
    server = TritonServer(tmp_path / "no-such-repository")
    with pytest.raises(ServerStartError, match="no-such-repository does not exist"):
        with server:
            pass
    assert not launched and not server.work.exists()


def test_sigterm_interrupts_a_start_but_not_the_stop_that_follows():
    """SIGTERM raises KeyboardInterrupt (so the `finally` stopping tritonserver runs), and while the stop runs a second
    Ctrl-C or SIGTERM is held off, so it cannot leave the server running; each handler is put back afterwards."""
    import signal
    import time

    from client.server import sigterm_as_interrupt, signals_held

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stopped = False
    with pytest.raises(KeyboardInterrupt):
        with sigterm_as_interrupt():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)  # the handler runs at the next bytecode: it raises before this returns
                pytest.fail("SIGTERM did not interrupt")
            finally:
                with signals_held():
                    os.kill(os.getpid(), signal.SIGTERM)  # a second one, mid-stop
                    os.kill(os.getpid(), signal.SIGINT)
                    stopped = True
    assert stopped and (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
