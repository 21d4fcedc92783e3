"""The conversion report: what happened to every annotation, counted per type and outcome.

Every annotation ends in exactly one outcome:
- exact: Label Studio shows what Dataloop shows, on every frame;
- approximated: converted with a named approximation (the reason says which);
- skipped: deliberately not converted, with a reason (e.g. the labeling config has no such label);
- failed: bad input, with the error.
Items that cannot be read at all are counted apart (`items.failed`). Pure data, no I/O.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

OUTCOMES = ("exact", "approximated", "skipped", "failed")

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape(text: object) -> str:
    """Text from the input (file names, ids, labels) made safe for one line of output: control
    characters become escapes, so a file named with a newline or an ANSI sequence cannot forge or
    recolour a line of the report."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(text))


def describe(err: BaseException) -> str:
    """A one-line reason for an error nobody foresaw, in the user's terms where we can."""
    if isinstance(err, RecursionError):
        return "nested too deeply to read"
    if isinstance(err, MemoryError):
        return "too large to convert in the memory available"
    text = str(err).splitlines()[0][:200] if str(err) else ""
    return f"unexpected {type(err).__name__}" + (f": {text}" if text else "")


class InputError(Exception):
    """Bad input: one line that names the file and, where known, the annotation."""

    def __init__(self, origin: str, annotation: str | None, reason: str):
        super().__init__(reason)
        self.origin = origin
        self.annotation = annotation
        self.reason = reason

    def __str__(self) -> str:
        where = self.origin if self.annotation is None else f"{self.origin}: annotation {self.annotation}"
        return escape(f"{where}: {self.reason}")


@dataclass(slots=True)
class Problem:
    outcome: str  # approximated | skipped | failed | item-failed | warning
    origin: str
    annotation: str | None
    type: str | None
    reason: str

    def line(self) -> str:
        where = self.origin if self.annotation is None else f"{self.origin}: annotation {self.annotation}"
        kind = f" ({self.type})" if self.type else ""
        return escape(f"{self.outcome}: {where}{kind}: {self.reason}")


@dataclass
class Report:
    items_converted: int = 0
    items_failed: int = 0
    items_unchanged: int = 0  # push: unchanged since dl2ls last wrote them, not converted again
    counts: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    problems: list[Problem] = field(default_factory=list)
    attributes: Counter = field(default_factory=Counter)  # "mapped" to config controls | "meta"
    max_error_px: float = 0.0
    keyframes: Counter = field(default_factory=Counter)  # "stored" Dataloop frames | "emitted"

    def count(self, type_: str, outcome: str, origin: str = "", annotation: str | None = None,
              reason: str | None = None) -> None:
        assert outcome in OUTCOMES, outcome
        self.counts[type_][outcome] += 1
        if outcome != "exact" and reason:
            self.problems.append(Problem(outcome, origin, annotation, type_, reason))

    def item_failed(self, err: InputError) -> None:
        self.items_failed += 1
        self.problems.append(Problem("item-failed", err.origin, err.annotation, None, err.reason))

    def warn(self, origin: str, reason: str, annotation: str | None = None) -> None:
        self.problems.append(Problem("warning", origin, annotation, None, reason))

    def merge(self, other: "Report") -> None:
        self.items_converted += other.items_converted
        self.items_failed += other.items_failed
        self.items_unchanged += other.items_unchanged
        for type_, counter in other.counts.items():
            self.counts[type_].update(counter)
        self.problems.extend(other.problems)
        self.attributes.update(other.attributes)
        self.keyframes.update(other.keyframes)
        self.max_error_px = max(self.max_error_px, other.max_error_px)

    @property
    def failed(self) -> bool:
        return self.items_failed > 0 or any(c["failed"] for c in self.counts.values())

    def to_json(self) -> dict:
        return {
            "items": {"converted": self.items_converted, "failed": self.items_failed,
                      **({"unchanged": self.items_unchanged} if self.items_unchanged else {})},
            "annotations": {
                t: {o: self.counts[t][o] for o in OUTCOMES} for t in sorted(self.counts)
            },
            "totals": {o: sum(c[o] for c in self.counts.values()) for o in OUTCOMES},
            "attributes": dict(self.attributes),
            "keyframes": dict(self.keyframes),
            "max_error_px": self.max_error_px,
            "problems": [
                {"outcome": p.outcome, "file": p.origin, "annotation": p.annotation, "type": p.type,
                 "reason": p.reason}
                for p in self.problems
            ],
        }

    def summary(self, max_lines: int = 20) -> str:
        lines = [f"items: {self.items_converted} converted, {self.items_failed} failed"
                 + (f", {self.items_unchanged} unchanged since dl2ls last wrote them (not converted again)"
                    if self.items_unchanged else "")]
        width = max([len(t) for t in self.counts] + [10])
        lines.append(f"{'type':<{width}}  " + "  ".join(f"{o:>12}" for o in OUTCOMES))
        for t in sorted(self.counts):
            lines.append(f"{t:<{width}}  " + "  ".join(f"{self.counts[t][o]:>12}" for o in OUTCOMES))
        if self.keyframes:
            lines.append(
                f"keyframes: {self.keyframes['stored']} stored Dataloop frames -> "
                f"{self.keyframes['emitted']} Label Studio keyframes"
            )
        if self.max_error_px:
            lines.append(f"largest error introduced by --tolerance: {self.max_error_px:.3f} px")
        if self.attributes:
            lines.append("attributes: " + ", ".join(f"{v} {k}" for k, v in sorted(self.attributes.items())))
        shown = [p for p in self.problems if p.outcome != "approximated"][:max_lines]
        approx = Counter(p.reason for p in self.problems if p.outcome == "approximated")
        for reason, n in approx.most_common():
            lines.append(f"approximated ×{n}: {reason}")
        for p in shown:
            lines.append(p.line())
        rest = sum(p.outcome != "approximated" for p in self.problems) - len(shown)
        if rest > 0:
            lines.append(f"… and {rest} more problems (see --report)")
        return "\n".join(lines)
