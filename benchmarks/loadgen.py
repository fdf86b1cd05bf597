"""A cheap closed-loop HTTP/1.1 load generator on raw asyncio streams (uvloop where installed).

A load generator on the machine it measures takes the cores the server wants: httpx took about 0.6
of a core at 64 connections on a 2-core machine, and the server seemed to halve. This one writes
each request from pre-built bytes over a kept-alive connection, reads the response by its
Content-Length (chunked bodies too), and does nothing else per request but time it and, where
asked, check the rows it holds. It reports its own CPU time (``resource.getrusage``) beside every
cell, so a reader can see what it took from the server.

Each client is a closed loop: send, wait for the whole answer, send the next. Client ``c`` sends the
bodies ``c, c + clients, c + 2 * clients, ...`` of the list it is given, so concurrent requests
carry distinct texts. A cell runs ``warmup`` seconds uncounted, then ``seconds`` counted; requests
completed inside the counted window count (latency: send to last byte). After the window no new
request is sent and the ones in flight are awaited (not counted), so the server is idle again when
``run_cell`` returns.

    python -m bgert.benchmarks.loadgen < spec.json    # one cell, its result as JSON on stdout
"""
from __future__ import annotations

import asyncio
import collections
import json
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

#: check(index of the body, status, response body) -> True when the answer holds its own rows
Check = Callable[[int, int, bytes], bool]


class Dropped(Exception):
    """The server closed the connection or sent something that is not an HTTP/1.1 response."""


class Connection:
    """One kept-alive HTTP/1.1 connection; ``request`` sends a POST and returns (status, body)."""

    def __init__(self, host: str, port: int, path: str):
        self.host, self.port, self.path = host, port, path
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                     "Connection: keep-alive\r\nContent-Length: ").encode()

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 22)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        self.writer.write(b"".join((self.head, str(len(body)).encode(), b"\r\n\r\n", body)))
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as e:
            self.close()
            raise Dropped(f"no response head: {type(e).__name__}") from None
        if not head.startswith(b"HTTP/1."):
            self.close()
            raise Dropped(f"not an HTTP response: {head[:40]!r}")
        status = int(head[9:12])
        length, chunked, keep = None, False, True
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                keep = value.strip().lower() != b"close"
        try:
            if chunked:
                parts = []
                while True:
                    size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    parts.append(await self.reader.readexactly(size + 2))
                    if size == 0:
                        break
                    parts[-1] = parts[-1][:-2]
                data = b"".join(parts[:-1])
            else:
                data = await self.reader.readexactly(length or 0)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError) as e:
            self.close()
            raise Dropped(f"incomplete body: {type(e).__name__}") from None
        if not keep:
            self.close()
        return status, data


@dataclass
class Cell:
    """What one cell counted (inside the window) and what the client spent."""

    clients: int
    seconds: float
    requests: int = 0
    items: int = 0
    latencies: list[float] = field(default_factory=list)
    statuses: collections.Counter = field(default_factory=collections.Counter)
    wrong: int = 0
    dropped: int = 0
    drop_reasons: collections.Counter = field(default_factory=collections.Counter)
    client_cpu_s: float = 0.0
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(p: float) -> float | None:
            return lat[min(len(lat) - 1, int(p / 100.0 * len(lat)))] * 1000.0 if lat else None

        return {"clients": self.clients, "seconds": self.seconds, "requests": self.requests, "items": self.items,
                "requests_per_s": self.requests / self.seconds, "items_per_s": self.items / self.seconds,
                "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "max_ms": pct(100),
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())}, "wrong": self.wrong,
                "dropped": self.dropped, "drop_reasons": dict(self.drop_reasons),
                "client_cpu_s": self.client_cpu_s, "wall_s": self.wall_s,
                "client_cores": self.client_cpu_s / self.wall_s if self.wall_s else None}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def run_cell(url: str, bodies: list[bytes], items: list[int], clients: int, seconds: float,
                   warmup: float = 2.0, check: Check | None = None) -> Cell:
    """One closed-loop cell of ``clients`` connections against ``url`` (see the module doc).

    ``bodies[i]`` is a ready JSON body holding ``items[i]`` inputs; ``check`` (optional) says whether
    a 200 answer to body ``i`` holds its own rows (a wrong one counts in ``wrong``, not as served).
    """
    u = urlsplit(url)
    conns = [Connection(u.hostname or "127.0.0.1", u.port or 80, u.path or "/") for _ in range(clients)]
    await asyncio.gather(*(c.open() for c in conns))
    cell = Cell(clients, seconds)
    cpu0, wall0 = _cpu(), time.perf_counter()
    t_measure = wall0 + warmup
    t_end = t_measure + seconds

    async def loop(k: int) -> None:
        conn = conns[k]
        i = k
        while time.perf_counter() < t_end:
            j = i % len(bodies)
            i += clients
            t = time.perf_counter()
            try:
                status, data = await conn.request(bodies[j])
            except (Dropped, OSError) as e:
                if t_measure <= time.perf_counter() <= t_end:
                    cell.dropped += 1
                    cell.drop_reasons[str(e).split(":")[0]] += 1
                continue
            done = time.perf_counter()
            if not t_measure <= done <= t_end:
                continue
            cell.statuses[status] += 1
            if status != 200:
                continue
            if check is not None and not check(j, status, data):
                cell.wrong += 1
                continue
            cell.requests += 1
            cell.items += items[j]
            cell.latencies.append(done - t)

    try:
        await asyncio.gather(*(loop(k) for k in range(clients)))
    finally:
        for c in conns:
            c.close()
    cell.client_cpu_s, cell.wall_s = _cpu() - cpu0, time.perf_counter() - wall0
    return cell


def embeddings_check(refs: Any, path: str, min_cos: float = 0.999) -> Check:
    """A ``check`` for embedding answers: each returned row has cosine >= ``min_cos`` to the reference
    row of its own text. ``refs[i]``: the [items, dim] reference rows of body ``i`` (unit vectors).
    ``path`` picks the answer's shape: OpenAI (``data[].embedding``) or TEI's /embed (a list of rows)."""
    import numpy as np
    import orjson

    openai = path.rstrip("/").endswith("embeddings")

    def check(i: int, status: int, data: bytes) -> bool:
        doc = orjson.loads(data)
        rows = [d["embedding"] for d in doc["data"]] if openai else doc
        got = np.asarray(rows, dtype=np.float32)
        want = refs[i]
        if got.shape != want.shape:
            return False
        cos = (got * want).sum(1) / np.maximum(np.linalg.norm(got, axis=1), 1e-12)
        return bool(cos.min() >= min_cos)

    return check


def main() -> int:
    """One cell from a JSON spec on stdin: url, bodies (JSON values), clients, seconds, warmup and,
    optionally, refs (a .npy file of [n_bodies, items, dim] reference rows) for the check."""
    spec = json.loads(sys.stdin.read())
    import orjson

    bodies = [orjson.dumps(b) for b in spec["bodies"]]
    items = [len(b["input"]) if isinstance(b.get("input"), list) else 1 for b in spec["bodies"]]
    check = None
    if spec.get("refs"):
        import numpy as np

        check = embeddings_check(np.load(spec["refs"], mmap_mode="r"), urlsplit(spec["url"]).path,
                                 spec.get("min_cos", 0.999))
    coro = run_cell(spec["url"], bodies, items, int(spec["clients"]), float(spec["seconds"]),
                    float(spec.get("warmup", 2.0)), check)
    try:
        import uvloop

        cell = uvloop.run(coro)
    except ImportError:
        cell = asyncio.run(coro)
    print(json.dumps(cell.summary()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
