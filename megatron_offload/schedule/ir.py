"""The schedule IR: per-rank lists of ops over (model chunk, microbatch) units.

Pure Python, no torch. Every consumer (simulator, renderer, runtime executor and the
Megatron integration's run-time order check) reads this one representation. The op kinds and
their properties are the table of :mod:`.kinds`; the key types of units and sub-units
(:data:`UnitKey`, :data:`LayerKey`, :data:`SubUnitKey`) are defined here, once, for the whole
package. ``docs/schedule-ir.md`` describes the IR and the passes over it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .kinds import FIRST_COPY_CODE, LETTERS, OpKind

UnitKey = tuple[int, int]
"""(model chunk, microbatch): a unit, what an op of the unit-level IR acts on."""
LayerKey = int | None
"""A part of a unit: a transformer layer's index in its model chunk, or None for the rest
(embedding, final norm, output layer, loss, the received input)."""
SubUnitKey = tuple[int, int, LayerKey]
"""(model chunk, microbatch, layer): a sub-unit, what an entry of the layer-level IR acts on."""


@dataclass(frozen=True, slots=True, order=True)
class Op:
    """One action of one rank: (kind, model chunk, microbatch[, layer]).

    A unit-level op (``layer`` None) acts on a whole (chunk, microbatch) unit; a layer-level
    entry (:mod:`.layers`) on one transformer layer of it. For F/B the unit-level entry of a
    layer-level list is the start of forward_step/backward_step (the rest's compute), for O/R
    the copy of the rest. Text form ``<chunk><kind><microbatch>[.<layer>]``: ``0F3`` = forward
    of chunk 0, microbatch 3; ``0F3.2`` = its layer 2. ``str(op)`` parses back with
    :meth:`Op.parse`. The kind's properties are in its row of :mod:`.kinds`.
    """

    kind: OpKind
    chunk: int
    microbatch: int
    layer: LayerKey = None

    @property
    def unit(self) -> UnitKey:
        return (self.chunk, self.microbatch)

    @property
    def sub_unit(self) -> SubUnitKey:
        return (self.chunk, self.microbatch, self.layer)

    @property
    def is_compute(self) -> bool:
        return self.kind.compute

    def __str__(self) -> str:
        if self.layer is None:
            return f"{self.chunk}{self.kind.value}{self.microbatch}"
        return f"{self.chunk}{self.kind.value}{self.microbatch}.{self.layer}"

    @classmethod
    def parse(cls, text: str) -> "Op":
        """The op of a text form, unit-level (``0F3``) or layer-level (``0F3.2``)."""
        match = _TEXT.match(text)
        if match is None:
            raise ValueError(
                f"{text!r} is not a unit op (e.g. '0F3': chunk, kind {'/'.join(LETTERS)}, "
                "microbatch) and not a layer op (e.g. '0F3.2': the same, then .layer)")
        layer = match.group(4)
        return cls(OpKind(match.group(2)), int(match.group(1)), int(match.group(3)),
                   None if layer is None else int(layer))


_TEXT = re.compile(rf"^\s*(\d+)([{LETTERS}])(\d+)(?:\.(\d+))?\s*$")


def F(chunk: int, microbatch: int) -> Op:
    return Op(OpKind.FORWARD, chunk, microbatch)


def B(chunk: int, microbatch: int) -> Op:
    return Op(OpKind.BACKWARD, chunk, microbatch)


def O(chunk: int, microbatch: int) -> Op:
    return Op(OpKind.OFFLOAD, chunk, microbatch)


def R(chunk: int, microbatch: int) -> Op:
    return Op(OpKind.RELOAD, chunk, microbatch)


class ScheduleError(ValueError):
    """A schedule that is malformed, inconsistent or would deadlock; the message shows where."""


@dataclass(frozen=True, slots=True)
class Schedule:
    """Per-rank op lists: ``ranks[r]`` is the order in which pipeline rank ``r`` runs its ops.

    Model chunk ``c`` on rank ``r`` is virtual pipeline stage ``c * pp + r`` (Megatron's
    layout): a forward of (c, mb) on rank r > 0 consumes the output of rank r - 1, on rank 0
    (c > 0) that of chunk c - 1 on rank pp - 1; backwards run the same chain in reverse.

    Offload (O) and reload (R) ops are asynchronous copies issued at their place in the list:
    O right after the unit's forward, R where the reload should start (before its backward).
    Schedules are plain data: generators are pure functions returning one, passes return a new
    one, ``to_text``/``from_text`` round-trip it exactly; ``validate.validate_schedule`` checks
    one. Ops are unit-level (no layer); layer-level orders are ``layers.LayerSchedule``.
    """

    ranks: tuple[tuple[Op, ...], ...]
    vpp: int
    microbatches: int
    kind: str = "custom"
    """Which generator made it (``1f1b``, ``interleaved``, ``gis``, ``custom``); informative."""
    group_size: int | None = None
    """Microbatch group size g of the table the order came from; None when not applicable."""
    _program: list | None = field(default=None, init=False, repr=False, compare=False)
    _compute_timing: object | None = field(default=None, init=False, repr=False, compare=False)
    """A Simulation of ``self.without_offload()`` (set by the offload pass): with the same
    costs, simulate() then only times the copies and checks they are hidden (see simulate.py)."""

    def __post_init__(self) -> None:
        if not isinstance(self.ranks, tuple) or not all(
            isinstance(ops, tuple) for ops in self.ranks
        ):
            object.__setattr__(self, "ranks", tuple(tuple(ops) for ops in self.ranks))
        if not self.ranks:
            raise ScheduleError("a schedule needs at least one rank")
        if self.vpp < 1 or self.microbatches < 1:
            raise ScheduleError(
                f"need vpp >= 1 and microbatches >= 1, got {self.vpp=}, {self.microbatches=}")

    @property
    def pp(self) -> int:
        return len(self.ranks)

    @property
    def units_per_rank(self) -> int:
        return self.vpp * self.microbatches

    @property
    def has_offload(self) -> bool:
        copies = FIRST_COPY_CODE * self.units_per_rank  # codes of copy ops start here
        return any(codes and max(codes) >= copies for codes in self.program())

    def offloaded_units(self, rank: int) -> set[UnitKey]:
        return {op.unit for op in self.ranks[rank] if op.kind is OpKind.OFFLOAD}

    def without_offload(self) -> "Schedule":
        """The same compute order with every copy (offload and reload op) removed."""
        compute = tuple(tuple(op for op in ops if op.kind.compute) for ops in self.ranks)
        return Schedule(compute, self.vpp, self.microbatches, self.kind, self.group_size)

    def with_program(self, program: list[list[int]]) -> "Schedule":
        """Attach op codes a generator or pass already has (saves recomputing them); returns
        self."""
        object.__setattr__(self, "_program", program)
        return self

    def program(self) -> list[list[int]]:
        """Per-rank integer op codes, computed once and cached: code = kind code * U + unit,
        U = vpp * microbatches, unit = chunk * microbatches + microbatch (kind codes:
        :mod:`.kinds`). Raises ScheduleError on a layer-level entry (that is a LayerSchedule's)."""
        if self._program is None:
            m = self.microbatches
            units = self.vpp * m
            program = []
            cache: dict[int, int] = {}  # id(op) -> code: generators share Op objects across ranks
            for ops in self.ranks:
                codes = []
                append = codes.append
                for op in ops:
                    code = cache.get(id(op))
                    if code is None:
                        if op.layer is not None:
                            raise ScheduleError(f"{op} is a layer-level entry; a unit-level "
                                                "Schedule takes unit ops only")
                        code = cache[id(op)] = op.kind.code * units + op.chunk * m + op.microbatch
                    append(code)
                program.append(codes)
            object.__setattr__(self, "_program", program)
        return self._program

    # ---- text form: one header line, then one comma-separated row of ops per rank ----------

    def to_text(self) -> str:
        header = (
            f"# megatron-offload schedule kind={self.kind} pp={self.pp} vpp={self.vpp} "
            f"microbatches={self.microbatches} group_size={self.group_size}"
        )
        rows = [",".join(map(str, ops)) for ops in self.ranks]
        return "\n".join([header, *rows]) + "\n"

    @classmethod
    def from_text(cls, text: str) -> "Schedule":
        lines = [line.strip() for line in text.splitlines()]
        header = next((ln for ln in lines if ln.startswith("#")), None)
        if header is None:
            raise ScheduleError(
                "schedule text lacks its '# megatron-offload schedule ...' header line")
        meta = dict(item.split("=", 1) for item in header.split() if "=" in item)
        try:
            vpp, microbatches = int(meta["vpp"]), int(meta["microbatches"])
        except (KeyError, ValueError) as error:
            raise ScheduleError(
                f"schedule header needs vpp= and microbatches=: {header!r}") from error
        group = meta.get("group_size", "None")
        rows = [ln for ln in lines if ln and not ln.startswith("#")]
        if "pp" in meta and int(meta["pp"]) != len(rows):
            raise ScheduleError(
                f"header says pp={meta['pp']} but the text has {len(rows)} rank rows")
        ranks = tuple(tuple(Op.parse(cell) for cell in row.split(",") if cell.strip())
                      for row in rows)
        layered = next((op for ops in ranks for op in ops if op.layer is not None), None)
        if layered is not None:
            raise ScheduleError(f"{layered} is a layer-level entry: read layer-level orders with "
                                "layers.LayerSchedule.from_text")
        return cls(ranks, vpp, microbatches, meta.get("kind", "custom"),
                   None if group == "None" else int(group))

    def save(self, path) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(self.to_text())

    @classmethod
    def load(cls, path) -> "Schedule":
        with open(path, encoding="utf-8") as handle:
            return cls.from_text(handle.read())


def diff_schedules(a: Schedule, b: Schedule, context: int = 3) -> str:
    """Human-readable differences between two schedules ('' when identical): per rank, the
    first step where the op lists diverge, with a few ops of context on each side."""
    lines = []
    if (a.pp, a.vpp, a.microbatches) != (b.pp, b.vpp, b.microbatches):
        lines.append(f"shape differs: pp/vpp/microbatches {a.pp}/{a.vpp}/{a.microbatches} vs "
                     f"{b.pp}/{b.vpp}/{b.microbatches}")
    for rank in range(min(a.pp, b.pp)):
        left, right = a.ranks[rank], b.ranks[rank]
        if left == right:
            continue
        step = next((i for i, (x, y) in enumerate(zip(left, right)) if x != y),
                    min(len(left), len(right)))
        lo = max(0, step - context)
        show = lambda ops, lo=lo, step=step: " ".join(map(str, ops[lo : step + context + 1]))  # noqa: E731
        lines.append(
            f"rank {rank}: first difference at step {step} ({len(left)} vs {len(right)} ops)")
        lines.append(f"  - {show(left)}")
        lines.append(f"  + {show(right)}")
    return "\n".join(lines)


def format_grid(schedule: Schedule, marks: dict[int, int] | None = None, window: int = 12) -> str:
    """The rank-by-step grid; ``marks`` maps rank -> step to flag as ``[op]``. Long schedules
    show the steps around the marked ones only (``window`` steps either side)."""
    marks = marks or {}
    longest = max(len(ops) for ops in schedule.ranks)
    if marks and longest > 2 * window + 1:
        centre = min(marks.values())
        lo, hi = max(0, centre - window), min(longest, max(marks.values()) + window + 1)
    else:
        lo, hi = 0, longest
    width = max([len(str(op)) for ops in schedule.ranks for op in ops[lo:hi]] + [3]) + 3
    header = "step   " + "".join(f"{step:>{width}}" for step in range(lo, hi))
    rows = [header]
    for rank, ops in enumerate(schedule.ranks):
        cells = []
        for step in range(lo, hi):
            text = str(ops[step]) if step < len(ops) else ""
            if marks.get(rank) == step:
                text = f"[{text or '?'}]"
            cells.append(f"{text:>{width}}")
        rows.append(f"rank {rank:<2}" + "".join(cells))
    if lo > 0 or hi < longest:
        rows.append(f"(steps {lo}..{hi - 1} of {longest})")
    return "\n".join(rows)


def neighbour_stage(rank: int, chunk: int, step: int, pp: int, vpp: int) -> tuple[int, int] | None:
    """(rank, chunk) of the virtual stage next to chunk ``chunk`` on ``rank``: the next one
    (``step`` +1) or the previous one (-1); None past either end of the pipeline.

    Model chunk c on rank r is virtual stage c * pp + r (Megatron's layout): the stage after
    the last rank's chunk c is rank 0's chunk c + 1."""
    if step > 0:
        if rank < pp - 1:
            return rank + 1, chunk
        return (0, chunk + 1) if chunk < vpp - 1 else None
    if rank > 0:
        return rank - 1, chunk
    return (pp - 1, chunk - 1) if chunk > 0 else None


def producer(rank: int, kind: OpKind, chunk: int, pp: int, vpp: int) -> tuple[int, int] | None:
    """Which rank and chunk make the p2p input of an op of ``kind`` (None: no p2p input).

    The producer is the op of the same kind and microbatch on the neighbouring virtual stage
    against the kind's flow (:attr:`.kinds.KindSpec.sends`): a forward needs the forward of the
    previous stage, a backward the backward of the next one. The first forward stage reads
    data and the last backward stage starts from the loss, which only needs the unit's own
    forward (ordered on the same rank, checked separately). Copies have no p2p input.
    This is the one definition of the pipeline's data flow; the numpy engines apply it to op
    codes (``validate.input_slots``).
    """
    flow = kind.sends
    return None if flow is None else neighbour_stage(rank, chunk, -flow.step, pp, vpp)


def consumer(rank: int, kind: OpKind, chunk: int, pp: int, vpp: int) -> tuple[int, int] | None:
    """Which rank and chunk consume the p2p output of an op of ``kind`` (None: nobody on
    another stage: the last virtual stage's forward ends in the loss, the first's backward in
    the data; copies send nothing): the neighbouring stage along the kind's flow."""
    flow = kind.sends
    return None if flow is None else neighbour_stage(rank, chunk, flow.step, pp, vpp)
