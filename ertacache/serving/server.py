"""Start and stop a real Triton Inference Server (``ertacache-triton serve``, the tests, tools/triton_load.py).

    with TritonServer(ServerConfig(repo="engines/triton")) as server:   # free loopback ports
        server.http_url, server.grpc_url                                # "127.0.0.1:PORT"
    # stopped (SIGTERM, then SIGKILL), its stub processes and shared memory cleaned up

The binary is the Triton build inside the ``nvidia-pytriton`` wheel (2.51 for 0.7.0) when that
is installed, else ``tritonserver`` on PATH / in /opt/tritonserver (the official container).
With the wheel, three things make its Python backend run a repository's ``model.py`` in a
virtual environment (each measured here, see docs/triton.md):

1. the backend folder needs the stub built for the environment's Python version (the wheel
   ships one per version under ``pytriton/tritonserver/python_backend_stubs/X.Y``);
2. the stub links ``libpython3.X.so.1.0``; unless ``LD_LIBRARY_PATH`` names the interpreter's
   own LIBDIR it may load the system's libpython with another build's standard library and fail
   at model load (``'_thread.RLock' object has no attribute '_recursion_count'``);
3. the stub embeds the base interpreter, so the environment's site-packages go on PYTHONPATH
   (model.py then reads their .pth files, which editable installs need).

Each start gets its own shared-memory prefix for the Python backend, so a killed server's
leftovers never collide with the next one.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ertacache.errors import ErtaCacheError, UserError

_starts = itertools.count()


class ServerError(ErtaCacheError):
    """The server did not start or died; the message carries the tail of its log."""


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class PythonEnv:
    """The interpreter whose packages the Python-backend stub uses."""

    executable: Path
    version: str  # "3.11"
    libdir: Path  # where its libpython3.X.so.1.0 is
    soname: str
    site_packages: tuple[Path, ...]

    @classmethod
    def of(cls, python: str | os.PathLike | None = None) -> "PythonEnv":
        probe = ("import json, site, sys, sysconfig; print(json.dumps({'version': '%d.%d' % sys.version_info[:2], "
                 "'libdir': sysconfig.get_config_var('LIBDIR'), 'soname': sysconfig.get_config_var('INSTSONAME'), "
                 "'shared': sysconfig.get_config_var('Py_ENABLE_SHARED'), 'site': site.getsitepackages()}))")
        exe = Path(python or sys.executable)
        try:
            info = json.loads(subprocess.run([str(exe), "-c", probe], check=True, capture_output=True, text=True).stdout)
        except (OSError, subprocess.CalledProcessError) as e:
            raise UserError(f"--python {exe} cannot be run ({e}); give the interpreter of the environment that has "
                            "ertacache installed") from None
        if not info["shared"]:
            raise UserError(f"{exe} (Python {info['version']}) was built without a shared libpython, which the "
                            "Python-backend stub links; use a Python built with --enable-shared (distribution "
                            "packages, pyenv with PYTHON_CONFIGURE_OPTS=--enable-shared)")
        return cls(exe, info["version"], Path(info["libdir"]), info["soname"], tuple(Path(p) for p in info["site"]))


@dataclass(frozen=True)
class TritonDistribution:
    """Where a tritonserver binary and its Python backend are."""

    binary: Path
    libs: Path | None = None  # shared libraries the wheel bundles (LD_LIBRARY_PATH)
    python_backend: Path | None = None  # libtriton_python.so + triton_python_backend_utils.py
    stubs: Path | None = None  # python_backend_stubs/X.Y/triton_python_backend_stub

    @classmethod
    def find(cls, tritonserver: str | os.PathLike | None = None) -> "TritonDistribution":
        if tritonserver is not None:
            path = Path(tritonserver)
            if not path.is_file():
                raise UserError(f"--tritonserver {path} does not exist")
            return cls(path)
        spec = importlib.util.find_spec("pytriton")
        if spec is not None and spec.origin is not None:
            root = Path(spec.origin).parent
            dist = root / "tritonserver"
            return cls(dist / "bin" / "tritonserver", root.parent / "nvidia_pytriton.libs",
                       dist / "backends" / "python", dist / "python_backend_stubs")
        for candidate in (shutil.which("tritonserver"), "/opt/tritonserver/bin/tritonserver"):
            if candidate and Path(candidate).is_file():
                return cls(Path(candidate))
        raise UserError("no Triton server found: pip install nvidia-pytriton (bash tools/triton_env.sh makes "
                        ".venv-triton with it), run inside the official tritonserver container, or pass "
                        "--tritonserver PATH")

    def stub(self, version: str) -> Path:
        stub = self.stubs / version / "triton_python_backend_stub"
        if not stub.is_file():
            have = sorted(p.name for p in self.stubs.iterdir()) if self.stubs.is_dir() else []
            raise UserError(f"this nvidia-pytriton has Python-backend stubs for Python {have}, not {version}; run "
                            "the server with one of those Pythons (--python)")
        return stub


@dataclass(frozen=True)
class ServerConfig:
    """How to start the server. Ports 0 are replaced by free ports on ``address``."""

    repo: Path
    address: str = "127.0.0.1"
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    explicit: bool = False  # --model-control-mode=explicit: load/unload through the API
    load_models: tuple[str, ...] = ()  # with explicit: the models loaded at start ("*": all)
    python: Path | None = None  # the environment model.py runs in (default: this interpreter's)
    tritonserver: Path | None = None  # default: TritonDistribution.find()
    log_verbose: int = 0
    startup_timeout_s: float = 180.0

    def __post_init__(self):
        object.__setattr__(self, "repo", Path(self.repo).absolute())
        if not self.repo.is_dir():
            raise UserError(f"--repo {self.repo} is not a folder; write one with ertacache-triton --engines DIR "
                            f"--repo {self.repo}")
        for name in ("http_port", "grpc_port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)} is not a TCP port")
        if self.load_models and not self.explicit:
            raise UserError("models to load at start need explicit model control (--explicit); without it every "
                            "model in the repository is loaded")
        check_repository_models(self.repo)


def check_repository_models(repo: Path) -> None:
    """Every model ertacache-triton wrote in ``repo`` carries this installed package's model.py (else: regenerate)."""
    from ertacache.serving.repository import check_model_file

    for config in sorted(Path(repo).glob("*/config.pbtxt")):
        try:
            ours = "ertacache-triton" in config.read_text(errors="replace")[:400]
        except OSError:
            continue
        if ours:
            check_model_file(config.parent)


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc): the Python-backend stubs of a server."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    """Running: a killed process may stay a zombie until its new parent (this container's init) reaps it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@dataclass
class TritonServer:
    """One tritonserver process (see the module docstring); a context manager."""

    config: ServerConfig
    workdir: Path | None = None  # default: a temporary folder, removed on stop
    log_dir: Path | None = None  # where server.log goes and stays after stop (default: the workdir)
    process: subprocess.Popen | None = field(default=None, init=False)
    ports: dict[str, int] = field(default_factory=dict, init=False)

    def __post_init__(self):
        self.dist = TritonDistribution.find(self.config.tritonserver)
        self._own_workdir = self.workdir is None
        self.workdir = Path(self.workdir or tempfile.mkdtemp(prefix="ertacache-triton-"))
        if self.log_dir is not None:
            self.log_dir = Path(self.log_dir).absolute()
            try:
                self.log_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"--log-dir {self.log_dir} cannot be created ({e.strerror}); choose another") from None
        self.shm_prefix = ""

    # ---- environment -----------------------------------------------------------------------------------------

    def _backend_dir(self, env: PythonEnv) -> Path | None:
        """The wheel's Python backend with the stub of this Python (as the wheel's own launcher does)."""
        if self.dist.python_backend is None:
            return None  # a regular installation: its backends folder already has a stub
        dest = self.workdir / "backends" / "python"
        if (dest / "triton_python_backend_stub").is_file():
            return dest.parent  # prepared by an earlier start (a restart after a kill)
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(self.dist.python_backend / name, dest / name)
        shutil.copy2(self.dist.stub(env.version), dest / "triton_python_backend_stub")
        return dest.parent

    def _env(self, env: PythonEnv) -> dict[str, str]:
        out = dict(os.environ)
        libs = [str(p) for p in (self.dist.libs, env.libdir) if p is not None]
        out["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in [os.environ.get("LD_LIBRARY_PATH")] if p])
        paths = [str(p) for p in env.site_packages] + [p for p in [os.environ.get("PYTHONPATH")] if p]
        out["PYTHONPATH"] = os.pathsep.join(paths)
        out["PATH"] = os.pathsep.join([str(env.executable.parent), os.environ.get("PATH", "")])
        return out

    def command(self, backend_dir: Path | None) -> list[str]:
        c, p = self.config, self.ports
        cmd = [str(self.dist.binary), f"--model-repository={c.repo}",
               f"--http-address={c.address}", f"--http-port={p['http']}",
               f"--grpc-address={c.address}", f"--grpc-port={p['grpc']}",
               f"--metrics-address={c.address}", f"--metrics-port={p['metrics']}", "--allow-gpu-metrics=false",
               f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
               f"--log-verbose={c.log_verbose}", "--exit-timeout-secs=10"]
        if backend_dir is not None:
            cmd.append(f"--backend-directory={backend_dir}")
        if c.explicit:
            cmd.append("--model-control-mode=explicit")
            cmd += [f"--load-model={m}" for m in c.load_models]
        return cmd

    # ---- lifetime --------------------------------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return (self.log_dir or self.workdir) / "server.log"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    @property
    def http_url(self) -> str:
        return f"{self.config.address}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"{self.config.address}:{self.ports['grpc']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config.address}:{self.ports['metrics']}/metrics"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self, wait: bool = True) -> "TritonServer":
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("the server is already running")
        c = self.config
        if not self.ports:  # a restart keeps the ports
            self.ports = {k: getattr(c, f"{k}_port") or free_port(c.address) for k in ("http", "grpc", "metrics")}
        env = PythonEnv.of(c.python)
        self.shm_prefix = f"ertacache{os.getpid()}x{next(_starts)}x"  # per start: a killed server's regions stay apart
        cmd = self.command(self._backend_dir(env))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._env(env),
                                            cwd=self.workdir, start_new_session=True)
        if wait:
            self.wait_ready(c.startup_timeout_s)
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float) -> None:
        """Until /v2/health/ready answers 200; a server that exits or takes too long raises with its log."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode} while starting; "
                                  f"log {self.log_path}:\n{self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.2)
        self.stop()
        raise ServerError(f"tritonserver was not ready after {timeout_s:.0f} s; log {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _cleanup(self, stubs: list[int]) -> None:
        """Stub processes outliving a killed server, and the Python backend's shared memory of this start."""
        for pid in stubs:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in stubs) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.shm_prefix:
            for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
                region.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL, as a crash would; then clean up what the server left."""
        if self.process is None or self.process.poll() is not None:
            return
        stubs = _children(self.process.pid)
        self.process.kill()
        self.process.wait()
        self._cleanup(stubs)

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM (Triton unloads its models), SIGKILL after ``timeout_s``."""
        if self.process is None or self.process.poll() is not None:
            return
        stubs = _children(self.process.pid)
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._cleanup(stubs)

    def close(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "TritonServer":
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
