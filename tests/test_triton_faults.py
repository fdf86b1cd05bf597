"""Triton faults with a real server: not up, killed in the middle of a stream of requests, restarted.

The server is the bundled tritonserver (bgert.triton_models.server), serving the tiny BGE through
the python-backend model step, on free ports of 127.0.0.1. It is killed with SIGKILL (its whole
process group, python-backend stubs included: a crash, not a shutdown) while 8 threads stream
requests through 4 shared model objects (gRPC and HTTP, without and with retries), then restarted
on the same ports. Checked: errors are TritonUnavailableError/TritonTimeoutError with a message a
user can act on, never a hang; clients with retries ride out the outage; every client works again
once the server is back; every result that does come back is the caller's own (equal to the
local ORT result for exactly its texts); and a restart that brings another export's graph under
the same name is refused, by new clients and by clients connected before it. The tests skip
only when tritonserver cannot start here.
"""
from __future__ import annotations

import itertools
import os
import random
import signal
import threading
import time

import numpy as np
import pytest

from bgert.runtime import Embedder

pytest.importorskip("tritonclient.grpc")
pytest.importorskip("tritonclient.http")
from bgert.runtime.triton_backend import TritonError, TritonTimeoutError, TritonUnavailableError  # noqa: E402
from bgert.triton_models.repository import write_repository  # noqa: E402
from bgert.triton_models.server import ServerUnavailable, TritonServer  # noqa: E402
from triton_start import start_or_skip  # noqa: E402

WORDS = ["panda", "bear", "bamboo", "北京", "Москва", "🐼", "retrieval", "of", "the"]
SHM_PREFIX = f"bgert_faults_{os.getpid()}_"  # the python backend's shared-memory regions, removed after kills
#: a client without retries may fail for a moment after a restart, while it reconnects
RECONNECT_S = 5.0


class Server(TritonServer):
    """The bundled server, plus a crash: SIGKILL of its process group and removal of its shm regions."""

    def crash(self) -> None:
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # the group this test started (start_new_session=True)
            p.wait()
        remove_shm()

    def url(self, protocol: str) -> str:
        return self.grpc_url if protocol == "grpc" else self.http_url


def remove_shm() -> None:
    for name in os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []:
        if name.startswith(SHM_PREFIX):
            os.remove(os.path.join("/dev/shm", name))


@pytest.fixture(scope="module")
def server(tiny_bge_art, tmp_path_factory):
    """A server for this module only (these tests kill it), not started yet."""
    repo = str(tmp_path_factory.mktemp("triton_faults") / "repo")
    write_repository(tiny_bge_art, repo, backend="python", device="cpu", max_batch_size=8, queue_delay_us=500,
                     threads=1)
    try:
        srv = Server(repo, extra_args=[f"--backend-config=python,shm-region-prefix-name={SHM_PREFIX}"])
    except ServerUnavailable as e:
        pytest.skip(f"tritonserver cannot start here: {e}")
    yield srv
    srv.stop()
    remove_shm()


def start(srv: Server) -> None:
    start_or_skip(srv, "test_triton_faults", timeout=240)


@pytest.fixture(scope="module")
def local(tiny_bge_art) -> Embedder:
    return Embedder(tiny_bge_art)


def recover(fn):
    """``fn()`` once the server is ready again, retried on TritonUnavailableError for up to RECONNECT_S."""
    deadline = time.monotonic() + RECONNECT_S
    while True:
        try:
            return fn()
        except TritonUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def remote(art: str, srv: Server, protocol: str, retries: int, backoff: float = 0.05, timeout: float = 20) -> Embedder:
    return Embedder(art, backend="triton", url=srv.url(protocol), protocol=protocol, retries=retries,
                    backoff=backoff, timeout=timeout)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_server_not_up_is_a_clear_error_and_the_same_client_works_once_it_is(server, tiny_bge_art, local, protocol):
    server.crash()  # not running (whatever an earlier test left)
    model = remote(tiny_bge_art, server, protocol, retries=2)
    t0 = time.monotonic()
    with pytest.raises(TritonUnavailableError, match=rf"cannot reach Triton at {server.url(protocol)} \({protocol}\)"
                                                    r".*after 3 attempts.*Is the server running.*triton-serve"):
        model.encode(["what is panda?"])
    assert time.monotonic() - t0 < 15  # refused connections fail fast, no hang
    start(server)
    texts = ["what is panda?", "北京 " * 40]
    assert np.abs(recover(lambda: model.encode(texts)) - local.encode(texts)).max() <= 1e-5


def test_killed_mid_stream_then_restarted(server, tiny_bge_art, local):
    """8 threads, 4 shared clients; SIGKILL mid-stream, restart on the same ports."""
    if server.proc is None:
        start(server)
    clients = {(p, r): remote(tiny_bge_art, server, p, retries=r, backoff=0.1)
               for p, r in itertools.product(("grpc", "http"), (0, 10))}  # 10 retries: ~100 s of patience
    for c in clients.values():
        c.encode("warm up")  # connect before the stream starts
    stop = threading.Event()
    log: dict[tuple, list] = {key: [] for key in clients}
    lock = threading.Lock()

    def worker(t: int, key: tuple) -> None:
        rng = random.Random(t)
        for i in itertools.count():
            if stop.is_set():
                return
            texts = [f"thread {t} call {i} item {j}: " + " ".join(rng.choices(WORDS, k=rng.randint(0, 60)))
                     for j in range(rng.randint(1, 4))]
            sent = time.monotonic()
            try:
                got: object = clients[key].encode(texts)
            except Exception as e:  # every failure is recorded and judged below
                got = e
            with lock:
                log[key].append((sent, texts, got))

    threads = [threading.Thread(target=worker, args=(t, key))
               for t, key in enumerate(k for k in clients for _ in range(2))]
    for th in threads:
        th.start()
    try:
        time.sleep(1.5)
        server.crash()
        time.sleep(1.5)
        start(server)
        back_at = time.monotonic()
        time.sleep(RECONNECT_S + 2.0)
    finally:
        stop.set()
        for th in threads:
            th.join(300)
    assert not any(th.is_alive() for th in threads), "a client hung after the server was killed"

    for key, entries in log.items():
        protocol, retries = key
        ok = [(texts, got) for _, texts, got in entries if isinstance(got, np.ndarray)]
        errors = [got for _, _, got in entries if not isinstance(got, np.ndarray)]
        if retries == 0:
            assert errors, f"{key}: the kill was not seen: no request failed while the server was down"
        # every result that came back is the caller's own
        for texts, got in ok:
            assert got.shape == (len(texts), 32) and np.abs(got - local.encode(texts)).max() <= 1e-5, (key, texts)
        # failures are the clear, documented ones
        for e in errors:
            assert isinstance(e, (TritonUnavailableError, TritonTimeoutError)), (key, repr(e))
            assert "cannot reach Triton" in str(e) or "timed out" in str(e), str(e)
        if retries:
            assert not errors, f"{key}: retries did not ride out the restart: {errors[0]}"
        # it works again: every request sent once the server was back (and reconnected) succeeded
        back = [got for sent, _, got in entries if sent > back_at + RECONNECT_S]
        assert back and all(isinstance(g, np.ndarray) for g in back), (key, [repr(g) for g in back[:3]])
    for key, c in clients.items():  # and a last call on each shared client
        assert np.abs(c.encode(["after the restart"]) - local.encode(["after the restart"])).max() <= 1e-5, key


def test_timeouts_are_bounded_and_clear(server, tiny_bge_art):
    """A server that accepts but cannot answer in time gives TritonTimeoutError, not a hang."""
    if server.proc is None:
        start(server)
    model = remote(tiny_bge_art, server, "grpc", retries=1, timeout=20)
    model.encode("connect first")
    model.backend_for(model.graph()).timeout = 1e-4
    t0 = time.monotonic()
    with pytest.raises(TritonTimeoutError, match=r"timed out after 0.0001s.*Raise timeout="):
        model.encode(["panda " * 300] * 8)
    assert time.monotonic() - t0 < 10


def test_restarted_with_another_models_graph_is_not_served_silently(server, tiny_bge_art, tiny_mean_art, local):
    """A restart that brings another export's graph under the same name must not change a client's results."""
    if server.proc is None:
        start(server)
    models = {p: remote(tiny_bge_art, server, p, retries=10, backoff=0.1) for p in ("grpc", "http")}
    for model in models.values():
        model.encode("connected to the right graph")
    server.crash()
    write_repository(tiny_mean_art, server.repo, name="bge-small-en-v1.5", backend="python", device="cpu",
                     max_batch_size=8, threads=1, force=True)
    start(server)
    # a new client refuses at once (the model config names another graph's sha256)
    with pytest.raises(TritonError, match="does not run this artifact's fp32 graph"):
        remote(tiny_bge_art, server, "grpc", retries=0).encode("new client")
    # clients connected before the restart refuse too, rather than return another model's vectors
    for protocol, model in models.items():
        with pytest.raises(TritonError, match=rf"\({protocol}\).*does not run this artifact's.*sha256"):
            model.encode(["what is panda?", "北京"])
