"""Find, start and stop the tritonserver that nvidia-pytriton bundles (for users without Docker, and tests).

The server runs from its own Python environment (made by scripts/make_triton_env.sh: numpy<2,
onnxruntime, tokenizers, nvidia-pytriton installed --no-deps), because the python backend's stub
embeds the environment it finds on PATH/VIRTUAL_ENV and the 2.51 stub breaks on string inputs
under numpy 2. The stub matching that environment's Python is copied next to the python backend in
a private backend directory inside the environment; site-packages is never modified.
"""
from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Sequence

ENV_VAR = "BGERT_TRITON_ENV"
MAKE_ENV = "scripts/make_triton_env.sh"


class ServerUnavailable(RuntimeError):
    """The bundled tritonserver is not installed or cannot start here."""


def default_env_dir() -> str:
    """$BGERT_TRITON_ENV, else ~/.cache/bgert/triton-env (the default of scripts/make_triton_env.sh)."""
    return os.environ.get(ENV_VAR) or os.path.join(os.path.expanduser("~"), ".cache", "bgert", "triton-env")


@dataclass
class ServerEnv:
    """Paths of a server environment made by scripts/make_triton_env.sh."""

    root: str
    site_packages: str
    python_version: str

    @property
    def tritonserver(self) -> str:
        return os.path.join(self.site_packages, "pytriton", "tritonserver", "bin", "tritonserver")

    @property
    def libs(self) -> str:
        return os.path.join(self.site_packages, "nvidia_pytriton.libs")

    @property
    def backend_dir(self) -> str:
        """A backend directory whose python/ holds the backend, its utils and the matching stub."""
        return os.path.join(self.root, "bgert-backends")

    def prepare_backends(self) -> str:
        """Copy the python backend and the stub for this env's Python into ``backend_dir`` (once)."""
        src = os.path.join(self.site_packages, "pytriton", "tritonserver")
        stub = os.path.join(src, "python_backend_stubs", self.python_version, "triton_python_backend_stub")
        if not os.path.isfile(stub):
            raise ServerUnavailable(f"nvidia-pytriton has no python backend stub for Python {self.python_version} "
                                    f"({stub}); remake the environment with PYTHON=python3.11 {MAKE_ENV}")
        dst = os.path.join(self.backend_dir, "python")
        if not os.path.isfile(os.path.join(dst, "triton_python_backend_stub")):
            tmp = dst + f".tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(os.path.join(src, "backends", "python"), tmp,
                            ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy2(stub, tmp)
            shutil.rmtree(dst, ignore_errors=True)
            os.replace(tmp, dst)
        return self.backend_dir

    def process_env(self) -> dict[str, str]:
        """Environment for the server process: the server env's python first, the bundled libraries."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "CONDA_PREFIX")}
        env["PATH"] = os.path.join(self.root, "bin") + os.pathsep + env.get("PATH", "")
        env["VIRTUAL_ENV"] = self.root
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (self.libs, env.get("LD_LIBRARY_PATH")) if p)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env


def find_env(root: str | None = None) -> ServerEnv:
    """The server environment at ``root`` (default: default_env_dir()), or ServerUnavailable saying how to make it."""
    root = os.path.abspath(root or default_env_dir())
    found = sorted(glob.glob(os.path.join(root, "lib", "python3.*", "site-packages", "pytriton", "tritonserver",
                                          "bin", "tritonserver")))
    if not found:
        raise ServerUnavailable(f"no bundled tritonserver in {root}. Make the server environment with "
                                f"`bash {MAKE_ENV} {root}` (from the bgert source tree) or set {ENV_VAR}.")
    site = found[0].split(os.sep + "pytriton" + os.sep)[0]
    version = os.path.basename(os.path.dirname(site)).replace("python", "")
    return ServerEnv(root=root, site_packages=site, python_version=version)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def server_command(env: ServerEnv, repo: str, host: str = "127.0.0.1", http_port: int = 8000,
                   grpc_port: int = 8001, metrics_port: int | None = None,
                   extra: Sequence[str] = ()) -> list[str]:
    """The tritonserver command line: the given repository, addresses pinned to ``host``."""
    cmd = [env.tritonserver, "--model-repository", os.path.abspath(repo),
           "--backend-directory", env.prepare_backends(),
           "--http-address", host, "--http-port", str(http_port),
           "--grpc-address", host, "--grpc-port", str(grpc_port)]
    if metrics_port is None:
        cmd += ["--allow-metrics", "false"]
    else:
        cmd += ["--metrics-address", host, "--metrics-port", str(metrics_port)]
    return cmd + list(extra)


class TritonServer:
    """A bundled tritonserver serving one repository on ``host`` with free (or given) ports.

    >>> with TritonServer("repo") as srv:          # waits until every model is ready
    ...     Embedder(art, backend="triton", url=srv.grpc_url)
    """

    def __init__(self, repo: str, *, env_dir: str | None = None, host: str = "127.0.0.1",
                 http_port: int | None = None, grpc_port: int | None = None, log_path: str | None = None,
                 exit_timeout: int = 5, extra_args: Sequence[str] = ()):
        self.env = find_env(env_dir)
        self.repo = os.path.abspath(repo)
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.log_path = log_path or os.path.join(self.repo, "tritonserver.log")
        self.cmd = server_command(self.env, self.repo, host, self.http_port, self.grpc_port, None,
                                  ["--exit-timeout-secs", str(exit_timeout), *extra_args])
        self.proc: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def start(self, timeout: float = 120.0) -> "TritonServer":
        """Start the server and wait until it reports ready (every model loaded)."""
        log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env.process_env(),
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        finally:
            log.close()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        url = f"http://{self.http_url}/v2/health/ready"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerUnavailable(f"tritonserver exited with code {self.proc.returncode} while starting:\n"
                                        f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise ServerUnavailable(f"tritonserver was not ready after {timeout:g}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server (it finishes in-flight requests), SIGKILL after ``timeout``."""
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the process that started the server dies (Linux), so a killed
    test run or benchmark leaves no server behind. (Linux sends it when the starting thread exits.)"""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_foreground(cmd: list[str], env: ServerEnv) -> int:
    """Run the server in the foreground until it exits or Ctrl-C (forwarded as SIGINT); it gets
    SIGTERM when this process dies, so killing ``bgert triton-serve`` leaves no server behind."""
    proc = subprocess.Popen(cmd, env=env.process_env(), preexec_fn=_die_with_parent)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(35)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
    finally:
        sys.stdout.flush()
