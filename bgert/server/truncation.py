"""Over-long inputs: the server's ``--auto-truncate`` default and each API's per-request setting.

``bgert serve`` truncates an input longer than the model's max length by default, as TEI does
(``--auto-truncate``, on; ``--no-auto-truncate`` refuses such inputs with 413). A request's own
setting wins over the flag:

* TEI routes (and bgert's own, and the OpenAI route as an extension): ``truncate`` (bool) and
  ``truncation_direction`` ``Right`` (keep the start of the text) or ``Left`` (keep its end);
* Cohere routes: ``truncate`` ``END`` (keep the start), ``START`` (keep the end) or ``NONE`` (refuse).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import APIError

#: TEI's truncation_direction and Cohere's truncate, as the runtime's truncation_side
TEI_SIDES = {"right": "right", "left": "left"}
COHERE_SIDES = {"END": "right", "START": "left"}


@dataclass(frozen=True)
class Truncation:
    """What a request does with an over-long input: cut it (on ``side``; None: the model's default,
    the end of the text) or refuse it; ``hint`` says how the request turns cutting on."""

    cut: bool = True
    side: str | None = None
    hint: str = "send truncate=true"

    def refuse(self, name: str, max_length: int) -> APIError:
        return APIError(413, f"an input is longer than {name}'s max length ({max_length} tokens) and truncation is "
                             f"off for this request; shorten it, or {self.hint}", "Validation", "truncate")


def tei(truncate: bool | None, direction: str | None, auto: bool) -> Truncation:
    """TEI's ``truncate`` / ``truncation_direction`` (either case), ``truncate`` None taking the server's flag."""
    side = None if direction is None else TEI_SIDES[direction.lower()]
    return Truncation(auto if truncate is None else truncate, side, "send truncate=true")


def cohere(truncate: str | None, auto: bool) -> Truncation:
    """Cohere's ``truncate`` (END, START, NONE), None taking the server's flag (END when on)."""
    hint = 'send "truncate": "END" (or "START" to keep the end)'
    if truncate is None:
        return Truncation(auto, None, hint)
    if truncate == "NONE":
        return Truncation(False, None, hint)
    return Truncation(True, COHERE_SIDES[truncate], hint)
