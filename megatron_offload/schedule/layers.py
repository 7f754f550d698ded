"""Layer-granular runtime IR: each unit's forward and backward split per transformer layer.

A unit (chunk, microbatch) is made of sub-units: one per transformer layer of the chunk, and
"the rest" (layer None): everything outside the layers (embedding, final norm, output layer,
loss) plus the unit's received input. A :class:`LayerOp` is one entry of a rank's runtime
list; ``expand_rank`` turns a unit-level compute order into the list the runtime follows
entry for entry:

- ``F(c,m)``: forward_step starts; ``F(c,m,l)``: layer l's forward; after it ``O(c,m,l)``
  when the layer streams; after the last layer ``O(c,m)`` when the whole unit leaves;
- ``B(c,m)``: backward_step starts (the rest's backward); ``B(c,m,l)``: layer l's backward,
  from the last layer down;
- ``R``: a reload, placed ``reload_distance`` compute entries before its first use
  (0 = immediately before it). A sub-unit whose reload would land with no compute entry
  between its offload and its reload is not offloaded at all: a copy out and back with
  nothing in between that could use the memory frees nothing.

Pure Python, no torch.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .ir import Op, OpKind

UnitKey = tuple[int, int]


@dataclass(frozen=True, slots=True)
class LayerOp:
    """One runtime entry: (kind, chunk, microbatch, layer); layer None = unit level."""

    kind: OpKind
    chunk: int
    microbatch: int
    layer: int | None = None

    @property
    def unit(self) -> UnitKey:
        return (self.chunk, self.microbatch)

    @property
    def sub_unit(self) -> tuple[int, int, int | None]:
        return (self.chunk, self.microbatch, self.layer)

    @property
    def is_compute(self) -> bool:
        return self.kind in (OpKind.FORWARD, OpKind.BACKWARD)

    def __str__(self) -> str:
        text = f"{self.chunk}{self.kind.value}{self.microbatch}"
        return text if self.layer is None else f"{text}.{self.layer}"

    _TEXT = re.compile(r"^\s*(\d+)([FBOR])(\d+)(?:\.(\d+))?\s*$")

    @classmethod
    def parse(cls, text: str) -> "LayerOp":
        match = cls._TEXT.match(text)
        if match is None:
            raise ValueError(
                f"not a layer op: {text!r} (expected e.g. '0F3' or '0F3.2': chunk, F/B/O/R, "
                "microbatch, optional .layer)")
        layer = None if match.group(4) is None else int(match.group(4))
        return cls(OpKind(match.group(2)), int(match.group(1)), int(match.group(3)), layer)

    @classmethod
    def of(cls, op: Op | "LayerOp") -> "LayerOp":
        if isinstance(op, LayerOp):
            return op
        return cls(op.kind, op.chunk, op.microbatch, None)


def _layers_of(layers_per_chunk: int | Sequence[int], chunk: int) -> int:
    return layers_per_chunk if isinstance(layers_per_chunk, int) else layers_per_chunk[chunk]


def expand_rank(
    ops: Iterable[Op],
    layers_per_chunk: int | Sequence[int],
    *,
    streamed: Iterable[UnitKey],
    offloaded: Iterable[UnitKey],
    reload_distance: int | Callable[[LayerOp], int] = 0,
) -> list[LayerOp]:
    """The runtime list of one rank (see the module docstring); O/R ops in ``ops`` are ignored."""
    offloaded = set(offloaded)
    streamed = set(streamed) | offloaded
    entries: list[LayerOp] = []
    for op in ops:
        c, m = op.chunk, op.microbatch
        layers = _layers_of(layers_per_chunk, c)
        if op.kind is OpKind.FORWARD:
            entries.append(LayerOp(OpKind.FORWARD, c, m))
            for layer in range(layers):
                entries.append(LayerOp(OpKind.FORWARD, c, m, layer))
                if (c, m) in streamed and (layer < layers - 1 or (c, m) in offloaded):
                    entries.append(LayerOp(OpKind.OFFLOAD, c, m, layer))
            if (c, m) in offloaded:
                entries.append(LayerOp(OpKind.OFFLOAD, c, m))
        elif op.kind is OpKind.BACKWARD:
            entries.append(LayerOp(OpKind.BACKWARD, c, m))
            for layer in reversed(range(layers)):
                entries.append(LayerOp(OpKind.BACKWARD, c, m, layer))
    return _place_reloads(entries, reload_distance)


def _place_reloads(entries: list[LayerOp], reload_distance) -> list[LayerOp]:
    compute_at = [i for i, e in enumerate(entries) if e.is_compute]
    index_of_compute = {position: k for k, position in enumerate(compute_at)}
    first_use = {}
    for i, e in enumerate(entries):
        if e.kind is OpKind.BACKWARD:
            first_use.setdefault(e.sub_unit, i)
    reload_before: dict[int, list[tuple[int, LayerOp]]] = {}
    dropped: set = set()
    for i, e in enumerate(entries):
        if e.kind is not OpKind.OFFLOAD:
            continue
        use = first_use.get(e.sub_unit)
        if use is None:
            raise ValueError(f"{e}: the unit has no backward in this order")
        distance = reload_distance(e) if callable(reload_distance) else reload_distance
        if distance < 0:
            raise ValueError(f"reload distance {distance} must be >= 0")
        k = max(index_of_compute[use] - distance, 0)
        at = compute_at[k]
        # The compute entries strictly between the offload and the reload's issue point.
        between = sum(1 for j in compute_at if i < j < at)
        if at <= i or between == 0:
            dropped.add(e.sub_unit)
            continue
        reload_before.setdefault(at, []).append((use, LayerOp(OpKind.RELOAD, *e.sub_unit)))
    out: list[LayerOp] = []
    for i, e in enumerate(entries):
        for _, reload in sorted(reload_before.get(i, ()), key=lambda x: x[0]):
            out.append(reload)
        if e.kind is OpKind.OFFLOAD and e.sub_unit in dropped:
            continue
        out.append(e)
    return out


def streamed_sub_units(entries: Iterable[LayerOp]) -> dict[UnitKey, set[int | None]]:
    """Per unit, the sub-units the list offloads (their O entries)."""
    out: dict[UnitKey, set[int | None]] = {}
    for e in entries:
        if e.kind is OpKind.OFFLOAD:
            out.setdefault(e.unit, set()).add(e.layer)
    return out
