"""The shared shape of every runtime class: preprocess → run (batched) → postprocess.

``BgeModel`` loads and checks an artifact (manifest, tokenizer, graphs), picks the graph for the
requested precision and provider, and runs token sequences through it in token-budget batches
(bgert.runtime.batching). Family classes (Embedder, M3Embedder, rerankers) only say how text
becomes token ids and how graph outputs become the user's result: each request-level method is a
prepare step returning a ``Request`` (bgert.runtime.request), which ``execute`` runs at once and
the token-counted queue (bgert.runtime.token_queue) runs in batches shared with other callers.
"""
from __future__ import annotations

import inspect
import logging
import os
import platform
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .backends import Backend, ProviderSpec, provider_names, resolve_providers, session_options
from .batching import Batch, check_buckets, default_token_budget, merge_runs, pad, plan_batches
from .cpu import cpu_flags
from .iobinding import bucket_shapes
from .manifest import ArtifactError, Graph, Manifest, read_manifest
from . import registry
from .progress import progress
from .ort_backend import make_ort_backend
from .providers import check_backend_options, uses_gpu
from .request import Item, Job, Request
from .token_queue import QueuedAPI
from .tokenize import TextTokenizer
from .windows import DEFAULT_WINDOW_SIZE, iter_windows, window_length

log = logging.getLogger("bgert")

#: x86 CPU flags whose int8 dot products (u8×s8) accumulate without saturating
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_int8_dot_exact() -> bool:
    """Whether this CPU's int8 GEMMs are exact: x86 with VNNI/AMX, or ARM64. On AVX2-only x86, u8×s8
    products saturate in 16 bits, so full-range int8 weights lose accuracy (the ``int8-vnni`` graph
    is then not chosen). BGERT_INT8_DOT=exact|saturating overrides the detection."""
    forced = os.environ.get("BGERT_INT8_DOT", "").lower()
    if forced in ("exact", "saturating"):
        return forced == "exact"
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    return bool(cpu_flags() & set(INT8_DOT_FLAGS))


#: x86 CPU flags with native bf16 arithmetic; OpenVINO's bf16 variant is offered only where one is present
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def graph_runs_well_here(g: Graph) -> bool:
    """False for graphs that need CPU flags this CPU lacks (``requires_cpu_flags`` in the manifest: any one
    of them suffices; the int8 dot-product flags go through cpu_int8_dot_exact and its override)."""
    need = set(g.extra.get("requires_cpu_flags") or ())
    if not need:
        return True
    if need <= set(INT8_DOT_FLAGS):
        return cpu_int8_dot_exact()
    return bool(need & cpu_flags())


def graph_backend(g: Graph) -> str:
    """The backend a graph entry is for: ``any`` (ONNX graphs every backend runs) or the one it names
    (the ``bf16`` entry reads model.onnx with OpenVINO's bf16 hint: ``openvino``)."""
    return str(g.extra.get("backend", "any"))


#: default precision preference when the caller names none and nothing was measured here (bgert tune), by
#: provider / backend (on CPU, only graphs that run well here count: int8-vnni only where int8 dot products
#: are exact, bf16 only with AMX-BF16 / AVX512-BF16)
CPU_PREFERENCE = ("int8-vnni", "int8", "fp32", "int8-static", "fp16")
#: without int8 dot products (AVX2-only x86) an int8 GEMM runs at about the fp32 rate, and the int8 graph's
#: quantize and smoothing ops cost more than it saves (AMD EPYC: int8 1.00x documents, 0.96x queries of fp32,
#: docs/precision.md): fp32 first where nothing was measured
CPU_PREFERENCE_NO_INT8_DOT = ("fp32", "int8", "int8-static", "fp16")


def cpu_preference() -> tuple[str, ...]:
    """The fixed CPU order for this CPU (used where nothing was measured)."""
    return CPU_PREFERENCE if cpu_int8_dot_exact() else CPU_PREFERENCE_NO_INT8_DOT


GPU_PREFERENCE = ("fp16", "fp32", "int8-static", "int8")
OPENVINO_PREFERENCE = ("bf16", "fp32", "ov-int8")


def default_precision(manifest: Manifest, on_gpu: bool, backend: str = "ort",
                      tuning: dict[str, Any] | None = None) -> str | None:
    """The precision used when none is asked for: the fastest one measured on this machine for ``backend``
    (``tuning``, see bgert.runtime.tuning) among the graphs that passed their gate and run well here, else
    the backend's first preference among those, else any that passed; None when none passed."""
    from .tuning import fastest

    prefs = GPU_PREFERENCE if on_gpu else OPENVINO_PREFERENCE if backend == "openvino" else cpu_preference()
    passed = {g.precision for g in manifest.graphs if g.gate_passed and (on_gpu or graph_runs_well_here(g))
              and graph_backend(g) in ("any", backend)}
    if backend == "openvino":
        passed &= set(OPENVINO_PREFERENCE)  # ORT's int8/fp16 graphs are ORT's
    measured = None if on_gpu else fastest(tuning, backend, sorted(passed))
    if measured is not None:
        return measured["precision"]
    return next((p for p in (*prefs, *manifest.precisions()) if p in passed), None)


def runs_here(m: Manifest, precision: str) -> bool:
    """Every graph of ``precision`` passed its gate and runs well on this CPU (a default may use it)."""
    return all(g.gate_passed and graph_runs_well_here(g) for g in m.graphs if g.precision == precision)


def tune_candidates(m: Manifest) -> list[tuple[str, str]]:
    """(backend, precision) pairs worth timing here: gated, runnable on this CPU and backend; the likely
    fastest first (the fixed orders), so a measurement cut short by its budget keeps them."""
    from .openvino_backend import openvino_available

    order = {p: i for i, p in enumerate(cpu_preference())}
    ov_order = {p: i for i, p in enumerate(OPENVINO_PREFERENCE)}
    backends = ["ort"] + (["openvino"] if openvino_available() else [])
    out = []
    for b in backends:
        for p in sorted(m.precisions(), key=lambda p: (order if b == "ort" else ov_order).get(p, 99)):
            if p == "fp16" or not runs_here(m, p):
                continue  # fp16 is a GPU graph; a failed or unmeasured gate is never a default
            if all(graph_backend(g) in (b, "any") for g in m.graphs if g.precision == p) and (b == "ort" or p in ov_order):
                out.append((b, p))
    return out


#: on the CPU provider a batch costs what its padded tokens cost, whatever its shape: batches are padded
#: only to a multiple of this (the manifest's power-of-two buckets serve GPU engines and CUDA graphs)
CPU_PAD_MULTIPLE = 8


def cpu_buckets(max_length: int) -> list[int]:
    """Length buckets for the CPU provider: every multiple of CPU_PAD_MULTIPLE, and max_length."""
    return sorted({*range(CPU_PAD_MULTIPLE, max_length, CPU_PAD_MULTIPLE), max_length})


#: FlagEmbedding constructor arguments that choose torch devices/dtypes; an ONNX artifact fixes
#: them at export (precision=, providers= are the runtime's equivalents), so they are accepted
#: for drop-in compatibility and ignored with one log line.
REFERENCE_ONLY_OPTIONS = ("use_fp16", "use_bf16", "devices", "trust_remote_code", "cache_dir", "pooling_method")


#: FlagEmbedding call arguments that choose torch devices or data loading (``device`` of its
#: encode/compute_score workers, ``use_dataloader`` and ``num_workers`` of its LLM rerankers): accepted
#: by every call and ignored, like REFERENCE_ONLY_OPTIONS in the constructor
REFERENCE_ONLY_CALL_OPTIONS = ("device", "use_dataloader", "num_workers")


def check_call_options(method: Callable[..., Any], options: Mapping[str, Any]) -> None:
    """Refuse keyword arguments that ``method`` does not take (a misspelt one must not be silently
    ignored), naming those it takes; FlagEmbedding's REFERENCE_ONLY_CALL_OPTIONS pass."""
    unknown = sorted(set(options) - set(REFERENCE_ONLY_CALL_OPTIONS))
    if unknown:
        takes = [n for n, p in inspect.signature(method).parameters.items()
                 if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self"]
        raise TypeError(f"{method.__qualname__}() got unknown keyword argument(s) {', '.join(unknown)}; it takes "
                        f"{', '.join(takes)} (and FlagEmbedding's {', '.join(REFERENCE_ONLY_CALL_OPTIONS)}, ignored)")


def _drop_reference_only_options(options: dict[str, Any]) -> None:
    dropped = [k for k in REFERENCE_ONLY_OPTIONS if k in options]
    for k in dropped:
        options.pop(k)
    if dropped:
        log.info("bgert: ignoring FlagEmbedding-only option(s) %s: the artifact fixes pooling and weights; "
                 "use precision= and providers= to choose the graph and device.", ", ".join(dropped))


def class_for_kind(kind: str) -> type["BgeModel"]:
    """The runtime class of ``kind``'s family (ArtifactError naming the kinds this bgert serves)."""
    if kind not in registry.FAMILIES:
        raise ArtifactError(f"this bgert has no runtime class for kind {kind!r}; "
                            f"it serves: {', '.join(sorted(registry.FAMILIES))}. Upgrade bgert.")
    return registry.FAMILIES[kind].runtime_class


def served_kinds(cls: type) -> set[str]:
    """The kinds a runtime class serves: those whose family names it, or its nearest registered base class."""
    for c in cls.__mro__:
        kinds = {k for k, fam in registry.FAMILIES.items() if fam.runtime_class is c}
        if kinds:
            return kinds
    return set()


class BgeModel(QueuedAPI):
    """Base of the runtime classes. Not used directly: see Embedder, M3Embedder, Reranker…

    Every class also gets the online-serving API of bgert.runtime.token_queue: ``a<method>``
    coroutines (``aencode``, ``acompute_score``…), ``submit()``, ``start_queue()``, ``close()``.
    """

    def __init__(self, model_dir: str | os.PathLike, *, precision: str | None = None,
                 providers: str | Sequence[ProviderSpec] | None = None,
                 intra_op_num_threads: int | None = None, inter_op_num_threads: int | None = None,
                 graph_optimization_level: str = "all", sess_options: Any = None,
                 token_budget: int | None = None, batch_size: int = 256,
                 length_buckets: Sequence[int] | None = None, verify: bool | str = True,
                 backend: str | None = None, show_progress_bar: bool = False, window_size: int = DEFAULT_WINDOW_SIZE,
                 **backend_options: Any):
        self.model_dir = os.fspath(model_dir)
        _drop_reference_only_options(backend_options)
        self.manifest: Manifest = read_manifest(self.model_dir, verify=verify, section=False)
        self._verified = verify is not False  # the graphs are the files the manifest's sha256 name
        if self.manifest.kind not in served_kinds(type(self)):
            raise ArtifactError(
                f"{self.model_dir} holds a {self.manifest.kind!r} model, which {type(self).__name__} "
                f"does not serve; use bgert.runtime.{class_for_kind(self.manifest.kind).__name__} "
                "or bgert.runtime.load().")
        self.manifest.section  # noqa: B018 (the kind's typed manifest section, checked now)
        if not os.path.isfile(self.manifest.tokenizer_file):
            raise ArtifactError(f"{self.manifest.tokenizer_file} is missing; re-export the artifact.")
        self.tokenizer = TextTokenizer(self.manifest.tokenizer_file, self.manifest.tokenizer_info,
                                       max_length=self.manifest.max_length)
        self.max_length = self.manifest.max_length
        self.batch_size = int(batch_size)
        self.window_size = window_length(int(window_size), 1)  # items tokenised and run at once (runtime.windows)
        self.length_buckets = check_buckets(length_buckets or self.manifest.length_buckets, self.max_length)
        self.show_progress_bar = show_progress_bar
        self.tuning: dict[str, Any] | None = None
        backend, precision, self.chosen_by = self._choose_variant(backend, precision, providers, intra_op_num_threads,
                                                                  backend_options)
        self.backend_name = backend
        self._backend_options = backend_options
        self._lock = threading.Lock()
        self._backends: dict[tuple[str, str], Backend] = {}
        if backend == "ort":
            self.providers = resolve_providers(providers)
            check_backend_options(backend_options)  # io_binding, cuda_graph, tensorrt_* (bgert.runtime.providers)
            self._sess_options = (intra_op_num_threads, inter_op_num_threads, graph_optimization_level, sess_options)
        elif backend == "openvino":
            from .openvino_backend import check_backend_options as check_openvino_options

            if providers not in (None, "cpu", "auto"):
                raise ValueError(f"backend='openvino' runs on the CPU; drop providers={providers!r}")
            self.providers = []
            check_openvino_options(backend_options)  # performance_hint, openvino_cache_dir, openvino_config
            self._sess_options = (intra_op_num_threads, inter_op_num_threads, graph_optimization_level, sess_options)
        elif backend == "triton":
            self.providers = []
        else:
            raise ValueError(f"backend must be 'ort', 'openvino' or 'triton', got {backend!r}")
        on_cpu = backend in ("ort", "openvino") and not self._on_gpu()
        if length_buckets is None and on_cpu:
            self.length_buckets = cpu_buckets(self.max_length)
        # padded tokens per batch: the caller's, else smaller on the CPU (bgert.runtime.batching.CPU_TOKEN_BUDGET)
        self.token_budget = int(token_budget) if token_budget is not None else default_token_budget(on_cpu)
        if self.token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {token_budget}")
        self.precision = self._choose_precision(precision)

    # ---- graph selection -------------------------------------------------------------------
    def _choose_variant(self, backend: str | None, precision: str | None, providers: Any, threads: int | None,
                        backend_options: Mapping[str, Any]) -> tuple[str, str | None, str]:
        """(backend, precision or None for the backend's default, how it was chosen).

        What the caller names wins; then BGERT_VARIANT; then, on the CPU, the fastest gated variant measured on
        this machine (bgert.runtime.autotune.measure_once: the first default load measures, once per artifact
        and machine); else ORT and the fixed order. ``backend=None`` (or ``"auto"``) lets the measurement pick
        the backend too, unless ORT-only arguments (providers, ORT options) or a precision that only one
        backend runs (bf16, ov-int8: OpenVINO) settle it.
        """
        from .openvino_backend import OPENVINO_BACKEND_OPTIONS
        from .tuning import fastest, variant_override

        env_backend, env_precision = (None, None) if precision else variant_override()
        on_gpu = backend in (None, "auto", "ort") and uses_gpu(resolve_providers(providers))
        if backend not in (None, "auto"):
            if env_precision and env_backend not in (None, backend):
                log.warning("bgert: BGERT_VARIANT=%s:%s ignored: this load asks for backend=%r", env_backend,
                            env_precision, backend)
                env_backend = env_precision = None
        else:
            named = {graph_backend(g) for g in self.manifest.graphs if g.precision == (precision or env_precision)}
            backend = (sorted(named - {"any"})[0] if named - {"any"} else env_backend if env_backend
                       else "ort" if on_gpu or providers not in (None, "auto") or (
                           backend_options and not set(backend_options) & set(OPENVINO_BACKEND_OPTIONS))
                       else "openvino" if backend_options else None)
        if precision:
            return backend or "ort", precision, "asked"
        if env_precision:
            return backend or "ort", env_precision, "BGERT_VARIANT"
        if backend in (None, "ort", "openvino") and not on_gpu:
            from .tuning import measure_once

            self.tuning = measure_once(self.model_dir, threads, lambda: tune_candidates(self.manifest))
        if backend is None:
            best = fastest(self.tuning, None, [p for p in self.manifest.precisions() if runs_here(self.manifest, p)])
            backend = best["backend"] if best else "ort"
        measured = fastest(self.tuning, backend, self.manifest.precisions())
        how = (f"measured here ({self.tuning.get('how', 'bgert tune')}, {self.tuning.get('measured_at')})"
               if measured else "fixed order (nothing measured here)")
        return backend, None, how

    def _on_gpu(self) -> bool:
        return uses_gpu(self.providers)

    def _choose_precision(self, precision: str | None) -> str:
        graphs = self.manifest.graphs
        wrong = {graph_backend(g) for g in graphs if g.precision == precision} - {"any", self.backend_name}
        if precision is not None and wrong:
            raise ValueError(f"precision {precision!r} runs on backend={sorted(wrong)[0]!r}; "
                             f"load the artifact with backend={sorted(wrong)[0]!r}.")
        have = self.manifest.precisions()
        if not graphs:
            raise ArtifactError(f"{self.model_dir}: the manifest lists no graphs; re-export the artifact.")
        if precision is not None:
            if precision not in have:
                raise ValueError(f"precision {precision!r} is not in this artifact; it has: {', '.join(have)}. "
                                 f"Export it with `bgert export ... --precision {precision}`.")
            if not all(g.gate_passed for g in graphs if g.precision == precision):
                log.warning("bgert: precision %s missed its quality gate at export (see `bgert info`); "
                            "using it because it was asked for.", precision)
            if not self._on_gpu() and not all(graph_runs_well_here(g) for g in graphs if g.precision == precision):
                log.warning("bgert: precision %s needs int8 dot products without saturation (VNNI/AMX); this CPU "
                            "lacks them and its results will be less accurate. Use precision='int8'.", precision)
            return precision
        chosen = default_precision(self.manifest, self._on_gpu(), self.backend_name, self.tuning)
        if chosen is None:
            raise ArtifactError(f"{self.model_dir}: no graph passed its quality gate; re-export the artifact.")
        return chosen

    def graph(self, **match: Any) -> Graph:
        """The graph of the chosen precision whose fields equal ``match`` (e.g. cutoff_layers)."""
        for g in self.manifest.graphs:
            if g.precision == self.precision and all(getattr(g, k) == v for k, v in match.items()):
                return g
        raise ArtifactError(f"{self.model_dir}: no {self.precision} graph with {match}")

    def _graph_of(self, file: str) -> Graph:
        """The chosen precision's graph entry of ``file``: two entries may name one file (``bf16`` reads the
        fp32 graph with OpenVINO's bf16 hint), and the entry, not the file, says how it runs."""
        same = [g for g in self.manifest.graphs if g.file == file]
        return next((g for g in same if g.precision == self.precision), same[0])

    def backend_for(self, graph: Graph) -> Backend:
        """The backend running ``graph``, created once (thread-safe)."""
        key = (graph.file, graph.precision)
        be = self._backends.get(key)
        if be is None:
            with self._lock:
                be = self._backends.get(key)
                if be is None:
                    be = self._make_backend(graph)
                    self._backends[key] = be
        return be

    def _make_backend(self, graph: Graph) -> Backend:
        if self.backend_name == "triton":
            from .triton_backend import TritonBackend

            return TritonBackend(self.manifest, graph, **self._backend_options)
        intra, inter, level, base = self._sess_options
        if self.backend_name == "openvino":
            from .openvino_backend import OpenVinoBackend

            return OpenVinoBackend(self.manifest.path(graph.file), graph.precision, num_threads=intra,
                                   **self._backend_options)
        opts = session_options(intra, inter, level, base)
        shapes = bucket_shapes(self.length_buckets, self.token_budget, self.batch_size)
        options = dict(self._backend_options)
        if base is not None or not self._verified:  # the caller's SessionOptions may change the graph in ways
            options.setdefault("session_cache", False)  # a key cannot see; unverified files may not be the hashed ones
        return make_ort_backend(self.manifest.path(graph.file), self.manifest, graph, self.providers, opts, shapes,
                                **options)

    # ---- batched execution ------------------------------------------------------------------
    def _plan_batches(self, lengths: Sequence[int], batch_size: int, multiple_of: int = 1,
                      run_cost_tokens: int = 0) -> list[Batch]:
        """How ``_run_batches`` cuts its inputs (bgert.runtime.batching); a family may override it.
        ``run_cost_tokens`` > 0: neighbouring buckets are merged where one run fewer pays (``merge_runs``)."""
        batches = plan_batches(lengths, self.length_buckets, self.token_budget, batch_size, multiple_of)
        return merge_runs(batches, run_cost_tokens, self.token_budget, batch_size)

    def _run_batches(self, sequences: Sequence[Sequence[int]], graph: Graph, output_names: Sequence[str],
                     batch_size: int | None = None, multiple_of: int = 1,
                     padding_side: str | None = None, extra_inputs: Any = None,
                     run_cost_tokens: int = 0) -> Iterator[tuple[Batch, list[np.ndarray], np.ndarray]]:
        """Yield (batch, outputs, attention_mask) per token-budget batch, longest first.

        ``extra_inputs(batch, ids, mask)`` may return more named inputs for the graph;
        ``run_cost_tokens``: see ``_plan_batches``.
        """
        backend = self.backend_for(graph)
        lengths = [len(s) for s in sequences]
        batches = self._plan_batches(lengths, batch_size or self.batch_size, multiple_of, run_cost_tokens)
        side = padding_side or self.tokenizer.padding_side
        for batch in progress(batches, enabled=self.show_progress_bar and len(batches) > 1,
                              desc=type(self).__name__, unit="batch"):
            ids, mask = pad([sequences[i] for i in batch.indices], batch.length, self.tokenizer.pad_token_id, side)
            feeds = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in backend.input_names:
                feeds["token_type_ids"] = np.zeros_like(ids)
            if extra_inputs is not None:
                feeds.update(extra_inputs(batch, ids, mask))
            yield batch, backend.run(feeds, output_names), mask

    # ---- streaming ------------------------------------------------------------------------
    def encode_iter(self, texts: Iterable[str], *, queries: bool = False, **kwargs: Any) -> Iterator[Any]:
        """Embedders: ``encode`` (``encode_queries`` with ``queries=True``) of each window of ``texts``, any
        iterable, yielded in order: an array [window, dim] per window (M3: BGEM3FlagModel's dict), so a
        corpus never has to fit in memory. Keyword arguments are ``encode``'s."""
        return iter_windows(self.encode_queries if queries else self.encode, texts, self.window_size, **kwargs)

    def compute_score_iter(self, sentence_pairs: Iterable[Any], **kwargs: Any) -> Iterator[Any]:
        """Rerankers (and M3): ``compute_score`` of each window of (query, passage) pairs, any iterable,
        yielded in order. Keyword arguments are ``compute_score``'s."""
        return iter_windows(self.compute_score, sentence_pairs, self.window_size, **kwargs)

    # ---- requests: prepare (tokenise) → run items → finish -------------------------------------
    def job(self, graph: Graph, outputs: Sequence[str], multiple_of: int = 1, padding_side: str | None = None) -> Job:
        """The ``Job`` that runs items through ``graph`` for ``outputs``."""
        return Job(graph.file, tuple(outputs), multiple_of, padding_side)

    def check_ids(self, sequences: Any) -> list[list[int]]:
        """Token id lists as given by a caller: ints within the vocabulary, at most max_length each
        (an id past the embedding table would fail deep inside the graph)."""
        if isinstance(sequences, (str, bytes, dict)) or not hasattr(sequences, "__iter__"):
            raise TypeError(f"token ids must be a list of lists of int, got {type(sequences).__name__}")
        vocab = self.tokenizer.vocab_size
        out = []
        for i, seq in enumerate(sequences):
            if isinstance(seq, (str, bytes, dict)) or not hasattr(seq, "__iter__"):
                raise TypeError(f"token ids[{i}] is {type(seq).__name__}, expected a list of int")
            seq = list(seq)
            bad = next((t for t in seq if isinstance(t, bool) or not isinstance(t, (int, np.integer))
                        or not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(f"token ids[{i}] holds {bad!r}, not a token id of this model (0..{vocab - 1})")
            if not 1 <= len(seq) <= self.max_length:
                raise ValueError(f"token ids[{i}] has {len(seq)} tokens; this model takes 1..{self.max_length}")
            out.append([int(t) for t in seq])
        return out

    def execute(self, request: Request) -> Any:
        """Run a prepared request at once, in the calling thread (the public methods do this)."""
        return request.finish(self.run_items(request.job, request.items, request.batch_size))

    def run_items(self, job: Job, items: Sequence[Item], batch_size: int | None = None,
                  run_cost_tokens: int = 0) -> list[Any]:
        """One row per pre-tokenised item (``_rows``), in order, run in token-budget batches
        (``run_cost_tokens`` > 0: neighbouring buckets merged where that is cheaper, as the queue asks)."""
        graph = self._graph_of(job.graph)
        seqs = [it.ids for it in items]
        names = sorted({k for it in items for k in (it.extra or {})})
        side = job.padding_side or self.tokenizer.padding_side

        def extra_inputs(batch: Batch, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
            feeds = {}
            for name in names:
                values = [items[i].extra[name] for i in batch.indices]
                feeds[name] = (np.asarray(values, dtype=np.int64) if np.ndim(values[0]) == 0
                               else pad(values, ids.shape[1], 0, side)[0])
            return feeds

        rows: list[Any] = [None] * len(items)
        for batch, outs, mask in self._run_batches(seqs, graph, job.outputs, batch_size, job.multiple_of, side,
                                                   extra_inputs=extra_inputs if names else None,
                                                   run_cost_tokens=run_cost_tokens):
            for i, row in zip(batch.indices, self._rows(job, outs, mask, [seqs[i] for i in batch.indices])):
                rows[i] = row
        return rows

    def _rows(self, job: Job, outputs: list[np.ndarray], mask: np.ndarray,
              sequences: list[Sequence[int]]) -> list[Any]:
        """Per row of a batch: its slice of the one output (a tuple of slices for several outputs).
        A family whose outputs have a token axis trims them here (M3)."""
        if len(outputs) == 1:
            return list(outputs[0].copy())
        return [tuple(o[j].copy() for o in outputs) for j in range(mask.shape[0])]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.model_dir!r}, kind={self.manifest.kind}, precision={self.precision}, "
                f"backend={self.backend_name}, providers={provider_names(self.providers)}, chosen_by={self.chosen_by!r})")
