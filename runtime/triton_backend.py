"""Run an artifact's graph on a Triton Inference Server instead of a local ORT session.

``TritonBackend`` implements the two members of bgert.runtime.backends.Backend, so every runtime
class keeps its own tokenisation, token-budget batching and length buckets on the client and
only the padded id tensors travel: ``Embedder(dir, backend="triton", url=..., protocol="grpc")``
gives the same outputs as the local backend. The server must serve a repository written by
``bgert triton-repo`` for the same artifact: its model step is checked against the graph's
sha256 when the backend is created and again after every connection failure, and each request
names that sha256 so bgert's python-backend model step refuses it when it runs another graph. Inference is idempotent, so transient failures (connection refused or reset, server
unavailable) are retried with exponential backoff before a clear error is raised; a timeout is
reported at once, since the server may still be running the request and a resend would add load.
"""
from __future__ import annotations

import http.client
import os
import re
import threading
from typing import Any, Callable, Sequence

import numpy as np

from .manifest import Graph, Manifest

DEFAULT_PORTS = {"grpc": 8001, "http": 8000}
#: the transient gRPC status codes worth a retry (the request never ran or may be re-run safely)
_RETRY_GRPC = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")
#: model-config parameters bgert writes so a client can check it talks to the right graph
PARAM_SHA256 = "bgert_graph_sha256"
PARAM_PRECISION = "bgert_precision"


#: errors meaning the server was not reached or went away mid-request (geventhttpclient's
#: HTTPConnectionClosed is an HTTPException); TimeoutError, an OSError too, is told apart first
_GONE = (ConnectionError, OSError, http.client.HTTPException)


class TritonError(RuntimeError):
    """Triton answered, but not with what this artifact needs (wrong model, bad request)."""


class TritonUnavailableError(TritonError):
    """The server cannot be reached, or the model is not loaded and ready."""


class TritonTimeoutError(TritonError):
    """A request did not finish within the client's timeout (not retried: the server may still run it)."""


class _Unreachable(Exception):
    """One attempt found the server unreachable (retried; TritonUnavailableError once retries are spent)."""


def sanitize_name(name: str) -> str:
    """A Triton model name (a directory name) from any string: letters, digits, ``-``, ``_``, ``.``."""
    out = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._-")
    return out or "model"


def default_repo_name(manifest: Manifest) -> str:
    """The name ``bgert triton-repo`` gives an artifact's models: the artifact directory's name."""
    return sanitize_name(os.path.basename(os.path.normpath(os.path.abspath(manifest.root))))


def model_step_name(base: str, graph: Graph) -> str:
    """Name of the model that runs ``graph`` (token ids in): ``<base>_model``, plus ``_L<n>`` per cutoff."""
    suffix = "".join(f"_L{c}" for c in graph.cutoff_layers or [])
    return f"{base}_model{suffix}"


def _strip_scheme(url: str) -> str:
    return re.sub(r"^[a-z]+://", "", url).rstrip("/")


class TritonBackend:
    """One model on a Triton server, called with the padded batches the runtime builds.

    ``url`` is ``host:port`` (default 127.0.0.1:8001 for gRPC, :8000 for HTTP); ``model_name``
    defaults to the name ``bgert triton-repo`` gives this graph's model step. ``timeout`` (s)
    bounds each request; ``retries`` extra attempts follow connection failures, waiting
    ``backoff * 2**attempt`` seconds. Batches larger than the model's max_batch_size are split.
    Thread-safe: each thread gets its own client connection.
    """

    def __init__(self, manifest: Manifest, graph: Graph, *, url: str | None = None, protocol: str = "grpc",
                 model_name: str | None = None, model_version: str = "", timeout: float = 60.0,
                 retries: int = 3, backoff: float = 0.2):
        if protocol not in DEFAULT_PORTS:
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError(f"need timeout > 0, retries >= 0 and backoff >= 0 (got {timeout}, {retries}, {backoff})")
        try:
            if protocol == "grpc":
                import tritonclient.grpc as client_mod
            else:
                import tritonclient.http as client_mod
            import tenacity
            from tritonclient.utils import InferenceServerException, np_to_triton_dtype
        except ImportError as e:
            raise ImportError(f"backend='triton' needs tritonclient and tenacity ({e}); install them with "
                              "pip install 'bgert[triton]'") from e
        self._mod = client_mod
        self._exc = InferenceServerException
        self._wire_type = np_to_triton_dtype
        self._tenacity = tenacity

        self.protocol = protocol
        self.url = _strip_scheme(url or f"127.0.0.1:{DEFAULT_PORTS[protocol]}")
        self.model_name = model_name or model_step_name(default_repo_name(manifest), graph)
        self.model_version = str(model_version)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self._local = threading.local()
        self._manifest, self._graph = manifest, graph
        self._sha256 = manifest.raw.get("files", {}).get(graph.file)
        self._recheck = False
        self._check_model()

    # ---- connection ------------------------------------------------------------------------
    def _client(self) -> Any:
        c = getattr(self._local, "client", None)
        if c is None:
            if self.protocol == "grpc":
                c = self._mod.InferenceServerClient(self.url)
            else:
                c = self._mod.InferenceServerClient(self.url, connection_timeout=self.timeout,
                                                    network_timeout=self.timeout)
            self._local.client = c
        return c

    def _drop_client(self) -> None:
        c, self._local.client = getattr(self._local, "client", None), None
        try:
            if c is not None:
                c.close()
        except Exception:  # a broken connection may fail to close; it is dropped either way
            pass

    def _where(self) -> str:
        return f"Triton at {self.url} ({self.protocol})"

    def _transient(self, e: BaseException) -> str | None:
        """'timeout' or 'unavailable' for errors worth a retry, None for a definite answer."""
        if isinstance(e, self._exc):
            status = str(e.status() or "")
            msg = str(e.message() or "")
            if "DEADLINE_EXCEEDED" in status or "timed out" in msg.lower() or "timeout" in msg.lower():
                return "timeout"
            if any(s in status for s in _RETRY_GRPC) or "failed to connect" in msg.lower():
                return "unavailable"
            return None
        if isinstance(e, TimeoutError):
            return "timeout"
        if isinstance(e, _GONE):
            return "unavailable"
        return None

    def _call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        """``fn(client)``, retried by tenacity while the server is unreachable (``retries`` more attempts,
        ``backoff * 2**n`` s apart); a timeout is not retried; clear errors otherwise."""
        def attempt() -> Any:
            try:
                return fn(self._client())
            except Exception as e:  # tritonclient, grpc and socket errors have no common base
                kind = self._transient(e)
                if kind is None:
                    raise TritonError(f"{self._where()} rejected {what}: {_message(e)}") from e
                self._drop_client()  # reconnect on the next attempt
                self._recheck = True  # and make sure the server that answers then still runs our graph
                if kind == "timeout":  # the server may still be running it: a resend would pile up work
                    raise TritonTimeoutError(
                        f"{what} on {self._where()} timed out after {self.timeout:g}s (not retried: the server "
                        "may still be running it). Raise timeout=..., or check the server's load.") from e
                raise _Unreachable(_message(e)) from e

        t = self._tenacity
        retrying = t.Retrying(stop=t.stop_after_attempt(self.retries + 1),
                              wait=t.wait_exponential(multiplier=self.backoff, min=0),
                              retry=t.retry_if_exception_type(_Unreachable), reraise=True)
        try:
            return retrying(attempt)
        except _Unreachable as e:
            tries = f"{self.retries + 1} attempt{'s' if self.retries else ''}"
            raise TritonUnavailableError(
                f"cannot reach {self._where()} for {what} after {tries}: {e}. Is the server running "
                "and listening there? Start one with `bgert triton-serve REPO` (see the README's Triton section), "
                "and check url= and protocol=.") from e.__cause__

    # ---- model checks ----------------------------------------------------------------------
    def _check_model(self) -> None:
        """The model is ready and runs this graph (sha256 in its config); read its batch size and I/O."""
        manifest, graph = self._manifest, self._graph
        opts = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
        self._call("a liveness check", lambda c: c.is_server_live(**opts))
        ready = self._call(f"a readiness check of model {self.model_name!r}",
                           lambda c: c.is_model_ready(self.model_name, self.model_version, **opts))
        if not ready:
            index = self._call("the repository index", lambda c: c.get_model_repository_index(**opts))
            raise TritonUnavailableError(
                f"model {self.model_name!r} is not ready on {self._where()}; the server has: "
                f"{_describe_index(index)}. Serve the repository from `bgert triton-repo {manifest.root} --out REPO`, "
                "wait for it to load, or pass model_name=.")
        cfg = self._call(f"the config of {self.model_name!r}", lambda c: c.get_model_config(
            self.model_name, self.model_version, **({"as_json": True} if self.protocol == "grpc" else {}), **opts))
        cfg = cfg.get("config", cfg)
        self.max_batch_size = int(cfg.get("max_batch_size", 0) or 0)
        self.input_names = [i["name"] for i in cfg.get("input", [])]
        self.output_names = [o["name"] for o in cfg.get("output", [])]
        # outputs the graph gives per row as a scalar travel as dims [1] with reshape {shape: []}
        self._reshape = {o["name"]: [int(d) for d in o["reshape"].get("shape", [])]
                         for o in cfg.get("output", []) if "reshape" in o}
        params = {k: (v or {}).get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}
        want_sha = self._sha256
        got_sha = params.get(PARAM_SHA256)
        if got_sha and want_sha and got_sha != want_sha:
            got_prec = params.get(PARAM_PRECISION, "?")
            hint = (f"the server serves the {got_prec} graph; pass precision={got_prec!r}"
                    if got_prec != graph.precision else "the repository was made from another export; regenerate it")
            raise TritonError(f"model {self.model_name!r} on {self._where()} does not run this artifact's "
                              f"{graph.precision} graph {graph.file} (sha256 {got_sha[:12]}… ≠ {want_sha[:12]}…): {hint}.")

    # ---- Backend protocol ------------------------------------------------------------------
    def run(self, feeds: dict[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        """Outputs ``output_names`` for the batch ``feeds`` (split by the model's max_batch_size)."""
        missing = [n for n in output_names if n not in self.output_names]
        if missing:
            raise TritonError(f"model {self.model_name!r} on {self._where()} has no output {missing}; "
                              f"it has {self.output_names}")
        names = [n for n in self.input_names if n in feeds]
        rows = len(next(iter(feeds.values())))
        step = self.max_batch_size or rows
        parts = [self._infer({n: feeds[n][i:i + step] for n in names}, output_names)
                 for i in range(0, rows, step)] if rows else []
        if len(parts) == 1:
            return parts[0]
        return [np.concatenate([p[k] for p in parts]) for k in range(len(output_names))]

    def _infer(self, feeds: dict[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        if self._recheck:
            self._recheck = False
            self._check_model()
        mod = self._mod
        inputs = []
        for name, arr in feeds.items():
            arr = np.ascontiguousarray(arr)
            wire = self._wire_type(arr.dtype)
            if wire is None:
                raise TypeError(f"input {name!r} has dtype {arr.dtype}, which Triton does not take")
            inp = mod.InferInput(name, list(arr.shape), wire)
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        outputs = [mod.InferRequestedOutput(n) for n in output_names]
        opts: dict[str, Any] = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
        if self._sha256:
            opts["parameters"] = {PARAM_SHA256: self._sha256}
        result = self._call(f"inference on {self.model_name!r}", lambda c: c.infer(
            self.model_name, inputs, model_version=self.model_version, outputs=outputs, **opts))
        out = [result.as_numpy(n) for n in output_names]
        return [o.reshape(len(o), *self._reshape[n]) if n in self._reshape else o for n, o in zip(output_names, out)]


def _message(e: BaseException | None) -> str:
    if e is None:
        return "unknown error"
    msg = e.message() if hasattr(e, "message") and callable(e.message) else str(e)
    return msg or type(e).__name__


def _describe_index(index: Any) -> str:
    """'name (STATE: reason), …' from a repository index (gRPC message or HTTP JSON)."""
    if hasattr(index, "models"):
        index = [{"name": m.name, "state": m.state, "reason": m.reason} for m in index.models]
    items = [f"{m.get('name')} ({m.get('state') or 'not loaded'}"
             f"{': ' + m['reason'] if m.get('reason') else ''})" for m in index or []]
    return ", ".join(items) or "no models"
