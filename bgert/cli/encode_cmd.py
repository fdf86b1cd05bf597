"""``bgert encode DIR --input FILE|- --output FILE``: embed a corpus as a stream, one window at a time.

Input: txt (one text per line), jsonl (``--field``, ``--id-field``) or parquet (same options).
Output, written as it goes: ``.npy`` (a memory-mapped array; rows done are counted in
``OUT.progress`` until the run ends), ``.jsonl`` (one record per text, each window appended with one
write), or ``.parquet`` (a directory of part files, each renamed into place whole: a parquet dataset
any reader opens). M3 artifacts also write lexical weights ({token id: weight}, ``--sparse``) and
ColBERT vectors (lists, ``--colbert``) to jsonl/parquet. A killed run leaves a readable prefix without
torn rows; ``--resume`` continues after it. ``--ray auto|ADDRESS`` runs on a Ray cluster instead
(bgert.integrations.ray), parquet in and out.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from typing import Any, Iterator

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument_group("input")
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("--input", "-i", default="-", help="txt (one text per line), jsonl or parquet file; '-' for stdin")
    p.add_argument("--field", default="text", help="jsonl/parquet input: the text field (default: text)")
    p.add_argument("--id-field", default=None, help="jsonl/parquet input: a field to keep as each row's id")
    p.add_argument("--queries", action="store_true", help="apply the query instruction (encode_queries)")
    p = parser.add_argument_group("model and batching")
    p.add_argument("--batch-size", type=int, default=None, help="texts per batch at most (default: the model's, 256)")
    p.add_argument("--window-size", type=int, default=None, help="texts tokenised and written at once (default 4096)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per text at most (default: the artifact's)")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="padded tokens per batch run at most (rows x length bucket); the largest batch sets the "
                        "peak memory (default: 4096 on the CPU, 16384 on GPUs)")
    p.add_argument("--arena", default="on", choices=["on", "shrink", "off"],
                   help="ORT's CPU memory arena: on (keeps what the largest batch needed), shrink (gives unused "
                        "chunks back after every batch), off (plain malloc per tensor)")
    p.add_argument("--precision", default=None, help="graph precision (default: the runtime's choice, `bgert info`)")
    p.add_argument("--providers", default=None, help="comma-separated ORT providers (default: CPU)")
    p.add_argument("--backend", default="auto", choices=["auto", "ort", "openvino"],
                   help="auto: the fastest variant `bgert tune` measured here, else ORT; or ONNX Runtime, or "
                        "OpenVINO on the CPU (the openvino extra)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (ORT) / inference threads (OpenVINO)")
    p = parser.add_argument_group("output")
    p.add_argument("--output", "-o", required=True,
                   help=".npy (array), .jsonl (one record per line) or .parquet (a directory of part files)")
    p.add_argument("--sparse", action="store_true", help="m3: also write lexical weights (jsonl/parquet output)")
    p.add_argument("--colbert", action="store_true", help="m3: also write ColBERT vectors (jsonl/parquet output)")
    p.add_argument("--resume", action="store_true", help="keep what the output already holds and encode the rest")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = parser.add_argument_group("Ray Data")
    p.add_argument("--ray", default=None, metavar="auto|ADDRESS",
                   help="run on a Ray cluster through Ray Data (parquet in and out; needs bgert[ray])")
    p.add_argument("--concurrency", type=int, default=2, help="--ray: number of model actors (default 2)")


# ---- input -------------------------------------------------------------------------------------
def _fmt(path: str, first_line: str = "") -> str:
    if path.endswith(".parquet") or os.path.isdir(path):
        return "parquet"
    return "jsonl" if path.endswith(".jsonl") or first_line.lstrip().startswith("{") else "txt"


def _record_text(rec: dict, field: str, where: str) -> str:
    if field not in rec:
        raise ValueError(f"{where}: record has no {field!r} key (use --field)")
    return rec[field] if "title" not in rec else (rec["title"] + " " + rec[field]).strip()


def read_records(path: str, field: str = "text", id_field: str | None = None) -> Iterator[tuple[Any, str]]:
    """(id, text) per input record, streamed: txt lines (id = line index), jsonl records or parquet rows
    (id = ``id_field``, else the record index). A jsonl record with a title is embedded as title + text."""
    if _fmt(path) == "parquet":
        yield from _read_parquet(path, field, id_field)
        return
    f = sys.stdin if path == "-" else open(path, encoding="utf-8")
    try:
        lines = (line.rstrip("\r\n") for line in f)
        first = next(lines, None)
        if first is None:
            return
        lines = itertools.chain([first], lines)
        if _fmt(path, first) == "txt":
            yield from enumerate(lines)
            return
        n = 0
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if id_field is not None and id_field not in rec:
                raise ValueError(f"{path}:{lineno}: record has no {id_field!r} key (use --id-field)")
            yield (rec[id_field] if id_field else n), _record_text(rec, field, f"{path}:{lineno}")
            n += 1
    finally:
        if f is not sys.stdin:
            f.close()


def _read_parquet(path: str, field: str, id_field: str | None) -> Iterator[tuple[Any, str]]:
    import pyarrow.dataset as ds

    data = ds.dataset(path, format="parquet")
    missing = [c for c in (field, id_field) if c and c not in data.schema.names]
    if missing:
        raise ValueError(f"{path} has no column {missing[0]!r}; it has {data.schema.names} (use --field/--id-field)")
    n = 0
    for batch in data.to_batches(columns=[c for c in (field, id_field) if c]):
        texts = batch.column(field).to_pylist()
        ids = batch.column(id_field).to_pylist() if id_field else range(n, n + len(texts))
        yield from zip(ids, texts)
        n += len(texts)


def count_records(path: str) -> int | None:
    """How many records ``path`` holds (a cheap pass: lines, or parquet metadata); None for stdin."""
    if path == "-":
        return None
    if _fmt(path) == "parquet":
        import pyarrow.dataset as ds

        return ds.dataset(path, format="parquet").count_rows()
    with open(path, encoding="utf-8") as f:
        first = f.readline()
        if _fmt(path, first) == "txt":
            return (1 if first else 0) + sum(1 for _ in f)
        return (1 if first.strip() else 0) + sum(1 for line in f if line.strip())


# ---- output ------------------------------------------------------------------------------------
def _columns(result: Any) -> dict[str, Any]:
    """A window's result as named columns: ``vector`` (an embedder, or M3 asked for dense only), or M3's
    ``dense`` / ``sparse`` / ``colbert``."""
    if not isinstance(result, dict):
        return {"vector": np.asarray(result, dtype=np.float32)}
    if result["lexical_weights"] is None and result["colbert_vecs"] is None:
        return {"vector": result["dense_vecs"]}
    names = {"dense_vecs": "dense", "lexical_weights": "sparse", "colbert_vecs": "colbert"}
    return {names[k]: v for k, v in result.items() if v is not None}


class NpyWriter:
    """Rows into a memory-mapped .npy of the final shape; ``OUT.progress`` holds the rows done until the end."""

    def __init__(self, path: str, total: int | None, dim: int, resume: bool):
        if total is None:
            raise ValueError(".npy output needs a file input (its row count is fixed up front); "
                             "use a .jsonl or .parquet output for stdin")
        self.path, self.marker = path, path + ".progress"
        if resume and os.path.exists(path) and os.path.exists(self.marker):
            self.array = np.load(path, mmap_mode="r+")
            self.done = int(json.load(open(self.marker))["rows"])
        elif resume and os.path.exists(path):
            self.array, self.done = np.load(path, mmap_mode="r+"), total  # finished before
        else:
            self.array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(total, dim))
            self.done = 0
            self._mark()
        if self.array.shape != (total, dim):
            raise ValueError(f"{path} holds an array of shape {self.array.shape}, not ({total}, {dim}): "
                             "it was written from another input; drop --resume to start over")

    def _mark(self) -> None:
        tmp = self.marker + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"rows": self.done}, f)
        os.replace(tmp, self.marker)

    def write(self, ids: list, result: Any) -> None:
        vecs = _columns(result)["vector"]
        self.array[self.done:self.done + len(vecs)] = vecs
        self.array.flush()
        self.done += len(vecs)
        self._mark()

    def close(self) -> None:
        self.array.flush()
        del self.array
        os.remove(self.marker)


class JsonlWriter:
    """One JSON record per line; each window appended with a single write, a torn last line cut on resume."""

    def __init__(self, path: str, with_ids: bool, resume: bool):
        self.path, self.with_ids = path, with_ids
        self.done = 0
        if resume and os.path.exists(path):
            with open(path, "rb+") as f:
                data = f.read()
                keep = data.rfind(b"\n") + 1
                f.truncate(keep)
            self.done = data.count(b"\n", 0, keep)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if resume else os.O_TRUNC), 0o644)

    def write(self, ids: list, result: Any) -> None:
        cols = _columns(result)
        lines = []
        for i, row_id in enumerate(ids):
            if set(cols) == {"vector"} and not self.with_ids:
                rec: Any = np.round(cols["vector"][i].astype(float), 7).tolist()  # a plain vector per line
            else:
                rec = {"id": row_id} if self.with_ids else {}
                for k, v in cols.items():
                    v = v[i]
                    rec[k] = ({t: round(float(w), 7) for t, w in v.items()} if k == "sparse"
                              else np.round(np.asarray(v, dtype=float), 7).tolist())
            lines.append(json.dumps(rec, ensure_ascii=False))
        os.write(self.fd, ("\n".join(lines) + "\n").encode("utf-8"))
        self.done += len(ids)

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


def parquet_table(ids: list, result: Any) -> Any:
    """A pyarrow table: id, then vector, or M3's dense / sparse / colbert (bgert.integrations.arrow)."""
    import pyarrow as pa

    from bgert.integrations.arrow import m3_columns, vector_array, with_columns

    cols = _columns(result)
    arrays = {"vector": vector_array(cols["vector"])} if "vector" in cols else m3_columns(result)
    return with_columns(pa.table({"id": ids}), arrays)


class ParquetWriter:
    """A directory of part files ``part-<first row>.parquet``, each written to a temporary name and renamed."""

    def __init__(self, path: str, resume: bool):
        import pyarrow.parquet as pq

        self.pq, self.path = pq, path
        if os.path.isfile(path):
            raise ValueError(f"{path} is a file; .parquet output is a directory of part files")
        if not resume and os.path.isdir(path):
            for name in os.listdir(path):
                if name.startswith("part-"):
                    os.remove(os.path.join(path, name))
        os.makedirs(path, exist_ok=True)
        parts = sorted(n for n in os.listdir(path) if n.startswith("part-") and n.endswith(".parquet"))
        self.done = sum(pq.ParquetFile(os.path.join(path, n)).metadata.num_rows for n in parts)

    def write(self, ids: list, result: Any) -> None:
        final = os.path.join(self.path, f"part-{self.done:012d}.parquet")
        tmp = os.path.join(self.path, f".tmp-{self.done:012d}.parquet")
        self.pq.write_table(parquet_table(ids, result), tmp)
        os.replace(tmp, final)
        self.done += len(ids)

    def close(self) -> None:
        pass


def make_writer(path: str, total: int | None, dim: int, with_ids: bool, m3_extra: bool, resume: bool) -> Any:
    if path.endswith(".npy"):
        if with_ids or m3_extra:
            raise ValueError(".npy output holds vectors only; use .jsonl or .parquet for --id-field/--sparse/--colbert")
        return NpyWriter(path, total, dim, resume)
    if path.endswith(".jsonl"):
        return JsonlWriter(path, with_ids, resume)
    if path.endswith(".parquet"):
        return ParquetWriter(path, resume)
    raise ValueError(f"--output {path}: use a .npy, .jsonl or .parquet name")


class Progress:
    """texts/s and ETA: a tqdm bar where tqdm is installed, else one line per window on stderr."""

    def __init__(self, total: int | None, done: int, enabled: bool):
        self.total, self.done, self.start, self.bar = total, done, time.perf_counter(), None
        self.enabled, self.new = enabled, 0
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=done, unit="texts", desc="encode", smoothing=0.1)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        self.done += n
        self.new += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled:
            rate = self.new / max(time.perf_counter() - self.start, 1e-9)
            eta = f", ETA {(self.total - self.done) / rate:.0f}s" if self.total and rate else ""
            print(f"encode: {self.done}{f'/{self.total}' if self.total else ''} texts, {rate:.1f} texts/s{eta}",
                  file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> int:
    if args.ray:
        from bgert.integrations.ray import encode_parquet

        n = encode_parquet(args.artifact, args.input, args.output, address=args.ray, text_column=args.field,
                           concurrency=args.concurrency, batch_size=args.window_size or 1024,
                           queries=args.queries, sparse=args.sparse, colbert=args.colbert,
                           max_length=args.max_length, precision=args.precision, threads=args.threads)
        print(f"encoded {n} texts on Ray -> {args.output}", file=sys.stderr)
        return 0
    from bgert.runtime import family, load

    providers = args.providers.split(",") if args.providers else None
    kw: dict[str, Any] = {"window_size": args.window_size} if args.window_size else {}
    if args.max_batch_tokens is not None:
        kw["token_budget"] = args.max_batch_tokens
    if args.arena != "on":
        kw["arena"] = args.arena  # an ORT option: OpenVINO refuses it
    model = load(args.artifact, precision=args.precision, providers=providers, backend=args.backend,
                 intra_op_num_threads=args.threads, **kw)
    if not hasattr(model, "encode"):
        raise ValueError(f"{args.artifact} holds a {model.manifest.kind}, which scores pairs: bgert encode needs an "
                         "embedder or M3 artifact")
    m3 = "lexical_weights" in family(model.manifest.kind).outputs.values()  # BGE-M3 style outputs
    if (args.sparse or args.colbert) and not m3:
        raise ValueError("--sparse/--colbert need an M3 artifact")
    if args.resume and args.input == "-":
        raise ValueError("--resume needs a file input (stdin cannot be read again)")
    call = {"return_sparse": args.sparse, "return_colbert_vecs": args.colbert} if m3 else {}
    total = count_records(args.input)
    records = read_records(args.input, args.field, args.id_field)
    first = list(itertools.islice(records, 1))  # a missing field is an error before any output is made
    writer = make_writer(args.output, total, model.dim, args.id_field is not None, args.sparse or args.colbert,
                         args.resume)
    skipped = writer.done
    records = itertools.islice(itertools.chain(first, records), skipped, None)
    bar = Progress(total, skipped, enabled=not args.no_progress)
    window = model.window_size
    try:
        while True:
            chunk = list(itertools.islice(records, window))
            if not chunk:
                break
            ids, texts = [i for i, _ in chunk], [t for _, t in chunk]
            fn = model.encode_queries if args.queries else model.encode
            writer.write(ids, fn(texts, batch_size=args.batch_size, max_length=args.max_length, **call))
            bar.update(len(chunk))
    finally:
        bar.close()
    writer.close()
    print(f"encoded {writer.done - skipped} texts ({skipped} already written) with {model!r} -> {args.output}",
          file=sys.stderr)
    return 0
