"""The family registry: one small declarative description per model kind, registered once.

Optimum's exporter registry is the shape: a ``Family`` subclass per kind, registered by the
``@register`` decorator in the kind's own runtime module, and ``FAMILIES`` is the map every list of
kinds in the product reads (``load()``, the manifest's known kinds, ``bgert export --kind``,
detection, precision gating, ``bgert bench``, ``bgert triton-repo``, ``bgert info`` / ``doctor``).

A family owns:

- detection (``detect``): how strongly a checkpoint's config.json ``architectures`` / ``auto_map``,
  ``model_type``, its files (colbert_linear.pt, modules.json…) and, as a last hint only, its
  directory name say it is this kind;
- its export spec, as an import path (``"bgert.export.embedder_spec:EmbedderSpec"``), so the
  runtime never imports bgert.export (nor torch, transformers);
- its typed manifest section (a dataclass with defaults, checked when the manifest is read);
- its runtime class;
- what each graph output is for quality purposes (``OUTPUT_TYPES``): vectors, token vectors,
  lexical weights or scores; precision gates and bench comparisons follow them;
- its Triton pieces (raw-text inputs, tokenizer-side assembly, post-processing);
- its bench adapter, as an import path.

This module is a leaf: it imports nothing of bgert, so the manifest reader and every family module
may import it.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

#: what a graph output is, for quality: compared by cosine per row (vectors, lexical weights per
#: position), by cosine per token (token vectors), or by rank statistics (scores)
OUTPUT_TYPES = ("vectors", "token_vectors", "lexical_weights", "scores")

#: detection strengths, strongest first: the family's own files, its architecture class (or
#: auto_map), its model_type, and last its directory name
FILES, ARCHITECTURE, MODEL_TYPE, NAME_HINT = 4, 3, 2, 1
STRENGTH_NAMES = {FILES: "files", ARCHITECTURE: "architectures", MODEL_TYPE: "model_type", NAME_HINT: "name"}


class SectionError(ValueError):
    """A manifest section field that is missing or of the wrong type (the reader turns it into ArtifactError)."""


@dataclass(frozen=True)
class Checkpoint:
    """What detection reads from a checkpoint directory (no weights): config, architectures, files, name."""

    path: str
    name: str
    config: dict[str, Any]
    files: frozenset[str]

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type") or "")

    @property
    def architectures(self) -> list[str]:
        """config.json ``architectures`` and the class names its ``auto_map`` points at."""
        auto = self.config.get("auto_map") or {}
        mapped = [str(v).rsplit(".", 1)[-1] for v in (auto.values() if isinstance(auto, dict) else [])
                  if isinstance(v, str)]
        return [str(a) for a in self.config.get("architectures") or []] + mapped

    def has(self, *names: str) -> bool:
        return all(n in self.files for n in names)


class Family:
    """One model kind, described once. Subclasses set the class attributes; see the module doc."""

    #: the kind name written in manifests and taken by ``--kind``
    name: ClassVar[str] = ""
    #: the runtime class ``load()`` returns for this kind
    runtime_class: ClassVar[type]
    #: the typed manifest section (a dataclass; fields without a default are required)
    section: ClassVar[type]
    #: ``"module:Class"`` of the export spec (bgert.export), imported only when exporting
    export_spec: ClassVar[str] = ""
    #: ``"module:Class"`` of the bgert bench adapter, or None with ``bench_not_covered`` saying why
    bench_adapter: ClassVar[str | None] = None
    bench_not_covered: ClassVar[str] = ""
    #: graph output name → one of OUTPUT_TYPES
    outputs: ClassVar[dict[str, str]] = {}
    #: detection, declaratively: the strongest match wins (see ``detect``)
    required_files: ClassVar[tuple[str, ...]] = ()
    architectures: ClassVar[tuple[str, ...]] = ()  # fnmatch patterns, e.g. "*ForSequenceClassification"
    model_types: ClassVar[tuple[str, ...]] = ()
    name_hints: ClassVar[tuple[str, ...]] = ()
    #: Triton: the raw-text inputs of the ensemble (None: no ensemble for this kind yet), the
    #: post-processing step the ensemble ends with ("m3", "sigmoid" or None), renames of graph outputs
    triton_text_inputs: ClassVar[tuple[str, ...] | None] = None
    triton_postprocess: ClassVar[str | None] = None
    triton_renames: ClassVar[dict[str, str]] = {}

    @classmethod
    def detect(cls, ck: Checkpoint) -> int:
        """How strongly ``ck`` looks like this kind (FILES … NAME_HINT), 0 for not at all."""
        if cls.required_files and ck.has(*cls.required_files):
            return FILES
        if any(fnmatch.fnmatchcase(a, p) for a in ck.architectures for p in cls.architectures):
            return ARCHITECTURE
        if ck.model_type in cls.model_types:
            return MODEL_TYPE
        if any(h in ck.name for h in cls.name_hints):
            return NAME_HINT
        return 0

    @classmethod
    def output_type(cls, output: str) -> str:
        """The quality type of graph output ``output`` (an unknown output is an error, never a guess)."""
        if output not in cls.outputs:
            raise KeyError(f"family {cls.name!r} does not describe graph output {output!r} "
                           f"(it has {', '.join(cls.outputs)})")
        return cls.outputs[output]

    @classmethod
    def gives_scores(cls) -> bool:
        """Whether every output is a score (pairs in, scores out: rerankers)."""
        return bool(cls.outputs) and all(t == "scores" for t in cls.outputs.values())

    @classmethod
    def parse_section(cls, raw: dict[str, Any]) -> Any:
        """This kind's manifest section from the manifest's keys (SectionError naming a missing or mistyped field)."""
        return parse_dataclass(cls.section, raw)

    @classmethod
    def triton_assembly(cls, manifest: Any) -> dict[str, Any] | None:
        """Tokenizer-side settings the Triton tokenizer model needs for pairs (None: plain texts)."""
        return None

    @classmethod
    def default_text_length(cls, manifest: Any) -> int:
        """Tokens a text (a pair) is truncated to by default, as the runtime class does."""
        return int(manifest.max_length)


FAMILIES: dict[str, type[Family]] = {}


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: add ``cls`` to the registry under ``cls.name`` (once; a second one is a bug)."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in FAMILIES and FAMILIES[cls.name] is not cls:
        raise TypeError(f"kind {cls.name!r} is registered twice ({FAMILIES[cls.name].__name__}, {cls.__name__})")
    bad = {o: t for o, t in cls.outputs.items() if t not in OUTPUT_TYPES}
    if bad:
        raise TypeError(f"{cls.__name__}: output types {bad} are not among {OUTPUT_TYPES}")
    if not dataclasses.is_dataclass(cls.section):
        raise TypeError(f"{cls.__name__}.section must be a dataclass")
    FAMILIES[cls.name] = cls
    return cls


def kinds() -> tuple[str, ...]:
    """Every registered kind, in registration order (the detection and CLI order)."""
    return tuple(FAMILIES)


def family(kind: str) -> type[Family]:
    """The family registered for ``kind`` (KeyError listing the known ones)."""
    try:
        return FAMILIES[kind]
    except KeyError:
        raise KeyError(f"unknown model kind {kind!r}; known kinds: {', '.join(FAMILIES)}") from None


def load_object(target: str) -> Any:
    """``"module:attr"`` → the attribute (how export specs and bench adapters are named)."""
    mod, _, attr = target.partition(":")
    return getattr(importlib.import_module(mod), attr)


# ---- typed sections ------------------------------------------------------------------------------
def _matches(value: Any, tp: Any) -> bool:
    """Whether a JSON value fits the annotation ``tp`` (builtins, X | None, list[X], dict[K, V], Any)."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return isinstance(value, (list, tuple)) and (not args or all(_matches(v, args[0]) for v in value))
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def parse_dataclass(cls: type, raw: dict[str, Any]) -> Any:
    """An instance of dataclass ``cls`` from the keys of ``raw`` it names; SectionError for a required
    field that is missing or a field whose value has the wrong type."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name not in raw:
            if required:
                raise SectionError(f"lacks the field {f.name!r}")
            continue
        if not _matches(raw[f.name], hints[f.name]):
            raise SectionError(f"has field {f.name!r} = {raw[f.name]!r}, which is not {_type_name(hints[f.name])}")
        values[f.name] = raw[f.name]
    return cls(**values)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) if isinstance(tp, type) else str(tp).replace("typing.", "")


__all__ = ["ARCHITECTURE", "FAMILIES", "FILES", "MODEL_TYPE", "NAME_HINT", "OUTPUT_TYPES", "Checkpoint", "Family",
           "SectionError", "family", "kinds", "load_object", "parse_dataclass", "register"]
