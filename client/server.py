"""Start the real tritonserver binary that the nvidia-pytriton wheel ships, on a model repository.

Recipe (shared/docs/triton-local.md): copy the Python backend into a writable folder with the stub
for this Python, put the wheel's libraries and libpython on LD_LIBRARY_PATH, put this interpreter's
bin/ first on PATH (the stub takes sys.path from the python3 it finds there), wait for readiness.
"""

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from mailroute import contract
from mailroute.settings import SERVER_START_TIMEOUT_S

ROOT = Path(__file__).resolve().parent.parent  # this checkout: the stub environment must import mailroute from it


# The client pings every 30 s, also between calls (client.classifier_client.default_keepalive). Triton's
# defaults refuse pings without calls and answer a third such ping with GOAWAY "too_many_pings" (seen
# here after a client sat idle for minutes), so the server is told to accept them.
GRPC_KEEPALIVE = ("--grpc-keepalive-permit-without-calls=1", "--grpc-http2-min-recv-ping-interval-without-data=10000")


def repository_models(repo) -> list:
    """The models a server over this repository loads: the encoders every repository has, the flat encoder where one was
    exported, then the classifier (whose versions call them); the classifier alone where it runs the encoders itself."""
    from mailroute.repository import served_encoder_models  # here: the repository module loads faiss and tokenizers

    return served_encoder_models(repo) + [contract.CLASSIFIER]


# explicit mode's name for every model of the repository at start (tritonserver 2.51 `--load-model=*`): the repository holds
# mailroute's models only, and which encoders it has depends on the run exported (flat_encoder or not)
EVERY_MODEL = ("*",)


def serving_args(models=EVERY_MODEL, admin_key: str = "") -> list:
    """The tritonserver flags that make it serve mailroute, wherever it is started (this launcher; docker-compose.yml
    repeats them, and a test holds the two equal): keepalive pings accepted, explicit model control loading `models`
    (None: Triton's default mode, every model in the repository loaded at start), and with an admin key, repository and config changes refused without it
    (loading a model runs its code)."""
    args = list(GRPC_KEEPALIVE)
    if models is not None:
        args += ["--model-control-mode=explicit"] + [f"--load-model={m}" for m in models]
    if admin_key:
        groups = "model-repository,model-config"
        args += [f"--grpc-restricted-protocol={groups}:{contract.ADMIN_KEY}={admin_key}",
                 f"--http-restricted-api={groups}:{contract.ADMIN_KEY}={admin_key}"]
    return args


class ServerStartError(RuntimeError):
    """tritonserver could not start for a reason its user can usually fix: a wrong model repository, a port in
    use, nvidia-pytriton missing, a server that died or never got ready. `summary` is one line naming what was
    wrong; str() adds the tail of the server log where there is one (the CLI prints the two apart)."""

    def __init__(self, summary: str, log_tail: str = ""):
        super().__init__(summary + (f"\n{log_tail}" if log_tail else ""))
        self.summary, self.log_tail = summary, log_tail


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (docker stop, systemd, kill) raises KeyboardInterrupt as Ctrl-C does, so that the `finally` stopping a
    tritonserver runs: the server has its own session, so the signal never reaches it, and the default handler would
    end this process with the server left running on its ports. Main thread only (where Python runs handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:  # None: the old handler was not installed from Python
        signal.signal(signal.SIGTERM, signal.SIG_DFL if old is None else old)


@contextlib.contextmanager
def signals_held():
    """Ctrl-C and SIGTERM wait while a server is being stopped: a second signal must not cut the stop short and leave
    tritonserver (its own session: the terminal's Ctrl-C never reaches it) on its ports. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)


class ServerNotReady(ServerStartError, TimeoutError):
    """The server runs but did not answer ready within the start timeout (it has been stopped)."""


def check_repository(repo, models) -> None:
    """Refuse, before anything is launched, a model repository that is missing or lacks a model to be served."""
    repo = Path(repo)
    if not repo.is_dir():
        raise ServerStartError(f"model repository {repo} does not exist (or is not a folder): give it with --repo, "
                               f"or make one with `mailroute export`")
    missing = [m for m in models if not (repo / m).is_dir()]
    if missing:
        raise ServerStartError(f"model repository {repo} has no {' or '.join(missing)} model folder: "
                               f"wrong --repo, or not exported yet (`mailroute export --repo {repo}`)")


NOT_A_PORT = "not a TCP port number, 0-65535"


def port_problem(port: int):
    """Why tritonserver could not listen on `port` (it binds every address), or None when it can."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        return NOT_A_PORT
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port left in TIME_WAIT is free for tritonserver too
        try:
            s.bind(("0.0.0.0", port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytriton_dir() -> Path:
    spec = importlib.util.find_spec("pytriton")  # not `import pytriton`: it pulls in gevent and more
    if spec is None:
        raise ServerStartError("nvidia-pytriton is not installed (it ships the tritonserver binary): pip install nvidia-pytriton==0.7.0")
    return Path(spec.origin).parent


def backend_dir(work: Path) -> Path:
    pt = pytriton_dir()
    be = work / "backends"
    shutil.copytree(pt / "tritonserver" / "backends" / "python", be / "python", dirs_exist_ok=True)
    stub = pt / "tritonserver" / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerStartError(f"no Triton Python backend stub for Python {sys.version_info[0]}.{sys.version_info[1]} in {stub.parent.parent}")
    shutil.copy(stub, be / "python" / "triton_python_backend_stub")
    return be


def libpython_dir() -> str:
    """The folder holding libpython3.X.so.1.0, which the Python backend stub links against. In a venv
    sysconfig's LIBDIR names the base interpreter's; some images keep the library elsewhere (the lent
    GPU machine: /usr/lib/x86_64-linux-gnu), so look in the usual places too."""
    name = f"libpython{sys.version_info[0]}.{sys.version_info[1]}.so.1.0"
    candidates = [sysconfig.get_config_var("LIBDIR") or "", str(Path(sys.base_prefix) / "lib"),
                  f"/usr/lib/{sysconfig.get_config_var('MULTIARCH') or 'x86_64-linux-gnu'}", "/usr/local/lib", "/usr/lib"]
    return next((c for c in candidates if c and (Path(c) / name).exists()), candidates[0])


STUB_SITE_ENV = "MAILROUTE_STUB_SITE"
PYTHON_ENV_TMP = "/tmp/python_env_"  # where the Python backend makes its execution-env folders (fixed in the binary)


def stub_interpreter(work: Path, stub_site: str = "") -> Path:
    """The bin/ folder whose python3 the Python backend stub takes its sys.path from (the stub embeds
    Python in isolated mode: it ignores PYTHONPATH and derives sys.path from the python3 first on PATH).

    The stub in nvidia-pytriton 0.7.0 was built against numpy 1 (the wheel asks for numpy < 2). Under numpy
    >= 2 it copies every input tensor with the wrong stride: each element reads as the first one. INT64
    token ids [101, 7592, 102] arrive as [101, 101, 101] (wrong answers, no error) and a BYTES input
    crashes the stub ("unpack_from requires a buffer of at least 67372040 bytes"). Seen on the lent GPU
    machine (numpy 2.5) and reproduced here with numpy 2.2. So where this interpreter has numpy >= 2, a
    small venv is made for the stub that sees `stub_site` (a folder holding numpy < 2, e.g.
    `pip install --target DIR "numpy<2"`) before this interpreter's own packages; without one, refuse.
    The same venv carries $PYTHONPATH's folders to the stub (packages installed with --target)."""
    import numpy

    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]  # the stub would not see these either
    numpy2 = int(numpy.__version__.split(".")[0]) >= 2
    if not numpy2 and not extra:
        return Path(sys.executable).parent
    stub_site = stub_site or os.environ.get(STUB_SITE_ENV, "")
    if numpy2 and not stub_site:
        raise ServerStartError(f"numpy {numpy.__version__} here: the Triton Python backend stub of nvidia-pytriton 0.7.0 corrupts "
                               f"every input tensor under numpy >= 2. Set {STUB_SITE_ENV} to a folder holding numpy < 2 "
                               f"(pip install --target DIR 'numpy<2'), or use an environment with numpy < 2")
    if stub_site and not any(Path(stub_site).glob("numpy/__init__.py")):
        raise ServerStartError(f"{STUB_SITE_ENV}={stub_site}: no numpy package there; install one with pip install --target {stub_site} 'numpy<2'")
    import site
    import venv

    env = work / "stub-env"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env)
    lib = next((env / "lib").glob("python*")) / "site-packages"
    # .pth lines are appended in order after the venv's own (empty) site-packages: numpy < 2 first
    first = [str(Path(stub_site).resolve())] if stub_site else []
    # This interpreter's SciPy and scikit-learn were built for its numpy >= 2 and fail to import under the stub's
    # numpy 1; transformers imports scikit-learn whenever it finds it (generation's candidate generator), so the
    # encoders' stubs failed with "Could not import module 'AutoModel'" (lent H100). Nothing served needs either:
    # a None in sys.modules makes both look absent (importlib.util.find_spec answers None)
    hide = ["import sys; sys.modules.update(dict.fromkeys(('scipy', 'sklearn')))"] if numpy2 else []
    (lib / "mailroute_stub.pth").write_text("\n".join([*first, *map(str, map(Path.resolve, map(Path, extra))), *site.getsitepackages(),
                                                     str(ROOT), *hide]) + "\n")
    return env / "bin"


_LOG_ERROR = re.compile(r"^E\d{4} [\d:.]+\s+\d+ [^\]]*\] ?(.*)$")  # glog: E0101 12:00:00.123456 42 file.cc:99] message


def last_error(log: str) -> str:
    """The last error line of a tritonserver log (its message, without glog's prefix), or ""."""
    errors = [m.group(1).strip() for m in map(_LOG_ERROR.match, log.splitlines()) if m]
    return next((e for e in reversed(errors) if e), "")[:500]


class TritonServer:
    """A running tritonserver; use as a context manager. Ports default to free ones."""

    def __init__(self, repo, grpc_port: int = 0, http_port: int = 0, metrics_port: int = 0, explicit: bool = True,
                 models=None, admin_key: str = "", log_file=None, extra_args=(), stub_site: str = ""):
        """models: what explicit mode loads (None: repository_models, read again at each start: an export may add the
        flat encoder while the server runs)."""
        self.repo = Path(repo).resolve()
        self._models = None if models is None else list(models)
        self.grpc_port, self.http_port, self.metrics_port = grpc_port or free_port(), http_port or free_port(), metrics_port or free_port()
        self.explicit, self.admin_key, self.extra_args = explicit, admin_key, list(extra_args)
        self.stub_site = stub_site  # numpy < 2 for the backend stub where this interpreter has numpy >= 2 (stub_interpreter)
        self.work = Path(tempfile.mkdtemp(prefix="mailroute-triton-"))
        self.log_file = Path(log_file) if log_file else self.work / "triton.log"
        self.proc = None
        self._backends = None  # copied once: a restart reuses it (its stub may still be busy while old processes exit)

    @property
    def models(self) -> list:
        return repository_models(self.repo) if self._models is None else self._models

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def check_repository(self) -> None:
        """Refuse a repository without the models this server would load (explicit mode: all of them; else the classifier)."""
        check_repository(self.repo, self.models if self.explicit else [contract.CLASSIFIER])

    def check_ports(self, more: tuple = ()) -> None:
        """Refuse a port tritonserver (or, in `more`, a (name, port, flag) of the launcher's own, like readiness) could not
        listen on, by name, before anything starts."""
        ports = (("gRPC", self.grpc_port, "--grpc-port"), ("HTTP", self.http_port, "--http-port"),
                 ("metrics", self.metrics_port, "--metrics-port"), *more)
        flags = {}
        for name, port, flag in ports:  # free now, each alone, but two listeners cannot share one
            if port and port in flags:
                raise ServerStartError(f"{flags[port]} and {flag} are both {port}: give each its own port, or 0 for free ones")
            flags.setdefault(port, flag)
        for name, port, flag in ports:
            problem = port_problem(port)
            if problem:
                hint = "" if problem == NOT_A_PORT else "; another tritonserver running?"
                raise ServerStartError(f"{name} port {port} cannot be used ({problem}{hint}): "
                                       f"choose another with {flag}, or 0 for a free one")

    def command(self) -> list:
        binary = pytriton_dir() / "tritonserver" / "bin" / "tritonserver"
        if not binary.is_file():
            raise ServerStartError(f"no tritonserver binary at {binary}: the nvidia-pytriton install is incomplete "
                                   f"(pip install --force-reinstall nvidia-pytriton==0.7.0)")
        cmd = [str(binary), f"--model-repository={self.repo}",
               f"--backend-directory={self._backend_dir()}", f"--grpc-port={self.grpc_port}",
               f"--http-port={self.http_port}", f"--metrics-port={self.metrics_port}", "--log-verbose=0"]
        return cmd + serving_args(self.models if self.explicit else None, self.admin_key) + self.extra_args

    def _backend_dir(self) -> Path:
        if self._backends is None:
            self._backends = backend_dir(self.work)
        return self._backends

    def env(self) -> dict:
        env = dict(os.environ)
        libs = [str(pytriton_dir().parent / "nvidia_pytriton.libs"), libpython_dir()]
        env["LD_LIBRARY_PATH"] = ":".join(libs + [env.get("LD_LIBRARY_PATH", "")])
        env["PATH"] = f"{stub_interpreter(self.work, self.stub_site)}:{env.get('PATH', '')}"
        env.setdefault("HF_HUB_OFFLINE", "1")
        return env

    def check_log_file(self) -> None:
        """Refuse a log file the server could not write (a folder, no such folder, no permission), by name."""
        try:
            open(self.log_file, "a").close()
        except OSError as e:
            raise ServerStartError(f"--log {self.log_file}: cannot write the server log there ({e.strerror})") from None

    def start(self, timeout: float = SERVER_START_TIMEOUT_S) -> "TritonServer":
        self.check_repository()  # every caller, not only `mailroute serve`: a wrong repository launches nothing
        self.check_ports()
        self.check_log_file()
        self.log = open(self.log_file, "a")
        self._started = time.time()
        self.proc = subprocess.Popen(self.command(), env=self.env(), stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._session = self.proc.pid  # its own session and process group: stop() ends whatever is left in it
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                tail = self.tail()
                why = last_error(tail)
                raise ServerStartError(f"tritonserver exited with {self.proc.returncode} before it was ready"
                                       + (f": {why}" if why else ""), tail)
            if self.ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise ServerNotReady(f"tritonserver not ready after {timeout:.0f} s (models still loading? give a longer --timeout)",
                             self.tail())

    def restart(self, timeout: float = SERVER_START_TIMEOUT_S) -> "TritonServer":
        """Stop and start again on the same ports (the watchdog's last resort)."""
        self.stop()
        return self.start(timeout)

    def ready(self) -> bool:
        """Triton's own readiness: the process answers. It stays true when a backend stub dies; the
        proven readiness is client.watchdog.Watchdog (a canary classification)."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # tritonserver drains in-flight requests on SIGINT/SIGTERM
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc and self.proc.pid == getattr(self, "_session", None):
            # a backend stub tritonserver left behind (stopped while its models were still loading, the stub mid-start)
            # would wait for a parent that is gone: the server's own session holds nothing else, so end what is left
            # (once: a later stop must not signal a session id the system may have given to another process since)
            self._session = None
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):  # nothing left (the usual case)
                pass
        if getattr(self, "log", None):
            self.log.close()
        self._remove_python_envs()

    def _remove_python_envs(self) -> None:
        """The Python backend makes an empty /tmp/python_env_XXXXXX at load (for EXECUTION_ENV_PATH archives, which no
        model here uses; the path is compiled into libtriton_python.so) and leaves it when the server exits. Remove
        the empty ones made since this server started (rmdir: one in use for an extracted env is never empty)."""
        since = getattr(self, "_started", None)
        if since is None:
            return
        for d in Path(PYTHON_ENV_TMP).parent.glob(Path(PYTHON_ENV_TMP).name + "*"):
            try:
                if d.stat().st_mtime >= since - 1:
                    d.rmdir()
            except OSError:  # not empty, not ours, or gone already
                pass

    def stub_pid(self, model: str) -> int:
        """The Python-backend process of a model's first instance on this server (for fault drills)."""
        out = subprocess.run(["pgrep", "-af", "triton_python_backend_stub"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if f"{model}_0_0" in line and str(self.work) in line:
                return int(line.split()[0])
        raise LookupError(f"no backend process of {model} for the server in {self.work}:\n{out}")

    def cleanup(self) -> None:
        """Remove the server's temporary folder (backend copy, and the log unless it was given a path)."""
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self):
        self._signals = contextlib.ExitStack()
        self._signals.enter_context(sigterm_as_interrupt())  # a SIGTERM while it runs stops the server too
        try:
            return self.start()
        except BaseException:  # __exit__ never runs when __enter__ raises: stop what started and remove the temp folder
            self.__exit__()
            raise

    def __exit__(self, *exc):
        try:  # stopping is not cut short by a second signal; then SIGTERM's handler is put back
            with signals_held():
                self.stop()
                self.cleanup()
        finally:
            self._signals.close()
