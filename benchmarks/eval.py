"""Retrieval quality on a BEIR dataset: exact cosine search with an embedder, optionally
reranked by a reranker, scored with ir-measures (pytrec_eval) as MTEB/BEIR do.

    bgert eval ARTIFACT --beir scifact                      # the bundled SciFact test split
    bgert eval ARTIFACT --beir DIR --reranker RERANKER --top-k 100

A BEIR folder holds ``corpus.jsonl`` (or ``corpus.jsonl.gz``), ``queries.jsonl`` and
``qrels/<split>.tsv``. Document text is ``(title + " " + text).strip()``, BEIR's default; only
queries that have qrels are evaluated. Metrics come from ir-measures, never our own formulas.
"""
from __future__ import annotations

import gzip
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

#: the metrics every eval reports (ir-measures names), in report order
METRICS = ("nDCG@10", "R@100", "RR@10")
#: names the bundled datasets answer to (``--beir scifact``)
BUNDLED = ("scifact",)


@dataclass
class BeirData:
    """A BEIR test split: doc ids and texts, query ids and texts (with qrels only), and qrels."""

    name: str
    doc_ids: list[str]
    docs: list[str]
    query_ids: list[str]
    queries: list[str]
    qrels: dict[str, dict[str, int]]


def resolve_beir(where: str) -> str:
    """A BEIR directory: a bundled dataset's name (``scifact``) or a path."""
    if os.path.isdir(where):
        return where
    if where.lower() in BUNDLED:
        from importlib.resources import files

        return str(files("bgert.benchmarks") / "data" / where.lower())
    raise FileNotFoundError(f"--beir {where!r} is neither a directory nor a bundled dataset "
                            f"({', '.join(BUNDLED)}). Pass a BEIR folder with corpus.jsonl, "
                            "queries.jsonl and qrels/test.tsv.")


def _open_jsonl(directory: str, stem: str) -> list[dict[str, Any]]:
    for name, opener in ((f"{stem}.jsonl", open), (f"{stem}.jsonl.gz", gzip.open)):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with opener(path, "rt", encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
    raise FileNotFoundError(f"{directory} has no {stem}.jsonl (or {stem}.jsonl.gz): not a BEIR folder.")


def load_beir(where: str, split: str = "test", max_queries: int | None = None) -> BeirData:
    """Read a BEIR folder (or a bundled dataset name). Raises FileNotFoundError naming what is missing."""
    directory = resolve_beir(where)
    qrels_path = os.path.join(directory, "qrels", f"{split}.tsv")
    if not os.path.isfile(qrels_path):
        raise FileNotFoundError(f"{qrels_path} not found: a BEIR folder needs qrels/{split}.tsv.")
    qrels: dict[str, dict[str, int]] = {}
    with open(qrels_path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            parts = line.rstrip("\n").split("\t")
            if n == 0 and parts[-1] == "score" or not line.strip():
                continue
            if len(parts) != 3:
                raise ValueError(f"{qrels_path}:{n + 1}: expected query-id<TAB>corpus-id<TAB>score")
            qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    corpus = _open_jsonl(directory, "corpus")
    doc_ids = [str(d["_id"]) for d in corpus]
    docs = [(d.get("title", "") + " " + d.get("text", "")).strip() for d in corpus]
    queries = [q for q in _open_jsonl(directory, "queries") if str(q["_id"]) in qrels]
    if max_queries:
        queries = queries[:max_queries]
    if not queries:
        raise ValueError(f"{directory}: no query in queries.jsonl has qrels in {qrels_path}.")
    qids = [str(q["_id"]) for q in queries]
    name = os.path.basename(os.path.normpath(directory))
    return BeirData(name, doc_ids, docs, qids, [q["text"] for q in queries], {q: qrels[q] for q in qids})


def exact_search(query_vecs: np.ndarray, doc_vecs: np.ndarray, top_k: int,
                 chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k: (indices [nq, k] best first, scores [nq, k]), in query chunks."""
    q = query_vecs / np.maximum(np.linalg.norm(query_vecs, axis=1, keepdims=True), 1e-12)
    d = doc_vecs / np.maximum(np.linalg.norm(doc_vecs, axis=1, keepdims=True), 1e-12)
    k = min(top_k, d.shape[0])
    idx = np.zeros((q.shape[0], k), dtype=np.int64)
    val = np.zeros((q.shape[0], k), dtype=np.float32)
    for s in range(0, q.shape[0], chunk):
        sims = q[s:s + chunk] @ d.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1, kind="stable")
        idx[s:s + chunk] = np.take_along_axis(part, order, 1)
        val[s:s + chunk] = np.take_along_axis(sims, idx[s:s + chunk], 1)
    return idx, val


def score_run(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]],
              metrics: Sequence[str] = METRICS) -> dict[str, float]:
    """Aggregate metrics with ir-measures (pytrec_eval underneath), keyed by ir-measures name."""
    import ir_measures

    measures = [ir_measures.parse_measure(m) for m in metrics]
    agg = ir_measures.calc_aggregate(measures, qrels, run)
    return {str(m): float(agg.get(m, 0.0)) for m in measures}


def _run_dict(data: BeirData, idx: np.ndarray, scores: np.ndarray) -> dict[str, dict[str, float]]:
    return {qid: {data.doc_ids[j]: float(s) for j, s in zip(row_i, row_s)}
            for qid, row_i, row_s in zip(data.query_ids, idx, scores)}


def evaluate(artifact: str, beir: str, *, reranker: str | None = None, top_k: int = 100,
             precision: str | None = None, reranker_precision: str | None = None, threads: int | None = None,
             batch_size: int | None = None, max_queries: int | None = None, split: str = "test",
             rerank_options: dict[str, Any] | None = None, show_progress: bool = False) -> dict[str, Any]:
    """Embed corpus and queries with ``artifact``, search exactly, score; rerank the top-k if asked.

    Returns a JSON-ready dict: dataset counts, metrics of the embedder (and of the reranker on
    top of it), the settings and the wall times.
    """
    from bgert.runtime import load

    data = load_beir(beir, split, max_queries)
    model = load(artifact, precision=precision, intra_op_num_threads=threads, show_progress_bar=show_progress)
    if not hasattr(model, "encode_corpus"):
        raise ValueError(f"{artifact} holds a {model.manifest.kind!r} model; `bgert eval` needs an embedder "
                         "as the first argument (pass rerankers with --reranker).")
    depth = max(top_k, 100)
    t0 = time.perf_counter()
    doc_vecs = _dense(model.encode_corpus(data.docs, batch_size=batch_size))
    t_docs = time.perf_counter() - t0
    query_vecs = _dense(model.encode_queries(data.queries, batch_size=batch_size))
    t_embed = time.perf_counter() - t0
    idx, sims = exact_search(query_vecs, doc_vecs, depth)
    result: dict[str, Any] = {
        "dataset": {"name": data.name, "path": resolve_beir(beir), "split": split, "docs": len(data.docs),
                    "queries": len(data.queries), "qrels": sum(len(v) for v in data.qrels.values())},
        "embedder": {"artifact": os.path.abspath(artifact), "kind": model.manifest.kind, "precision": model.precision,
                     "max_length": model.max_length,
                     "query_instruction": getattr(model, "query_instruction_for_retrieval", None),
                     "metrics": score_run(data.qrels, _run_dict(data, idx, sims)),
                     "seconds": {"corpus": round(t_docs, 2), "queries": round(t_embed - t_docs, 2)}},
        "search": {"method": "exact cosine (numpy)", "depth": int(idx.shape[1])},
        "threads": threads,
    }
    if reranker:
        result["reranker"] = _rerank(reranker, data, idx, top_k, reranker_precision, threads, batch_size,
                                     rerank_options or {}, show_progress)
    return result


def _dense(out: Any) -> np.ndarray:
    """Dense vectors from an embedder's output (M3 returns a dict with ``dense_vecs``)."""
    if isinstance(out, dict):
        out = out["dense_vecs"]
    return np.asarray(out, dtype=np.float32)


def _rerank(artifact: str, data: BeirData, idx: np.ndarray, top_k: int, precision: str | None,
            threads: int | None, batch_size: int | None, options: dict[str, Any],
            show_progress: bool) -> dict[str, Any]:
    """Score (query, doc) for each query's first ``top_k`` candidates and evaluate that run."""
    from bgert.runtime import load

    model = load(artifact, precision=precision, intra_op_num_threads=threads, show_progress_bar=show_progress)
    if not hasattr(model, "compute_score"):
        raise ValueError(f"--reranker {artifact} holds a {model.manifest.kind!r} model, not a reranker.")
    cand = idx[:, :top_k]
    pairs = [(q, data.docs[j]) for q, row in zip(data.queries, cand) for j in row]
    t0 = time.perf_counter()
    scores = np.asarray(model.compute_score(pairs, batch_size=batch_size, **options), dtype=np.float64)
    seconds = time.perf_counter() - t0
    if scores.size != len(pairs):
        raise ValueError(f"the reranker returned {scores.size} scores for {len(pairs)} pairs; "
                         "for layerwise rerankers pick one cutoff (--cutoff-layer).")
    run = _run_dict(data, cand, scores.reshape(cand.shape))
    return {"artifact": os.path.abspath(artifact), "kind": model.manifest.kind, "precision": model.precision,
            "top_k": int(cand.shape[1]), "options": options, "metrics": score_run(data.qrels, run),
            "seconds": round(seconds, 2), "pairs": len(pairs)}


def markdown(result: dict[str, Any]) -> str:
    """A small Markdown table of the metrics, with the dataset, machine and command."""
    ds = result["dataset"]
    rows = [("embedder", result["embedder"])]
    if "reranker" in result:
        rows.append((f"+ reranker (top {result['reranker']['top_k']})", result["reranker"]))
    head = "| model | precision | " + " | ".join(METRICS) + " |"
    lines = [f"# Retrieval quality: {ds['name']} ({ds['split']}, {ds['docs']:,} docs, {ds['queries']} queries)", "",
             head, "|" + "---|" * (2 + len(METRICS))]
    for label, r in rows:
        name = os.path.basename(r["artifact"].rstrip("/"))
        lines.append(f"| {label}: {name} | {r['precision']} | "
                     + " | ".join(f"{r['metrics'][m]:.5f}" for m in METRICS) + " |")
    lines += ["", f"Exact cosine search; metrics by ir-measures {result.get('versions', {}).get('ir-measures', '')} "
              "(pytrec_eval). Document text = (title + ' ' + text).strip().", ""]
    if "machine" in result:
        from .machine import describe

        lines.append(f"Machine: {describe(result['machine'])}")
    if "command" in result:
        lines.append(f"Command: `{result['command']}`")
    return "\n".join(lines) + "\n"
