"""Layer streaming in the schedule IR: sub-units per transformer layer (issue 10).

Pure Python, no torch. The unit IR (:mod:`.ir`) moves whole (chunk, microbatch) units. With
layer streaming each transformer layer's saved activations are a sub-unit of their own: a
finished layer's activations start moving out while the next layer computes, and in the
backward they come back layer by layer. What is not in a transformer layer ("the rest":
embedding, final norm, output layer, loss, and the unit's received input) is one more
sub-unit, which only leaves when the whole unit does.

Entries of the expanded IR (:class:`.ir.Op` with a layer, text form in brackets):

- ``F(c, m)`` [``0F3``]: forward_step starts (the rest's forward before layer 0: the prologue);
- ``F(c, m, l)`` [``0F3.2``]: forward of layer l; ``O``/``R`` [``0O3.2``, ``0R3.2``]: the D2H /
  H2D copy of layer l's saved activations; ``O(c, m)``/``R(c, m)`` [``0O3``, ``0R3``]: the rest's;
- ``B(c, m)`` [``0B3``]: backward_step starts (the rest's backward before layer L-1's);
- ``B(c, m, l)`` [``0B3.2``]: backward of layer l.

:func:`expand_rank` turns one rank's unit-level compute order into this list (the one rule the
runtime follows too, checked op for op); :func:`reload_distances_for_link` places reloads as
late as a host link allows; ``layer_sim.simulate_layers`` runs the list in bytes and time.
"""
from __future__ import annotations

import bisect
import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from .ir import Op, Schedule, ScheduleError, SubUnitKey, UnitKey
from .kinds import Lane, OpKind

Distance = int | Callable[[SubUnitKey], int]
"""Compute entries between a reload and its first use: one number, or per sub-unit."""


def streamed_sub_units(entries: Iterable[Op]) -> dict[UnitKey, set]:
    """Per unit, the sub-units (layer index, or None for the rest) the list offloads."""
    out: dict[UnitKey, set] = {}
    for entry in entries:
        if entry.kind is OpKind.OFFLOAD:
            out.setdefault(entry.unit, set()).add(entry.layer)
    return out


def sub_unit_text(sub: SubUnitKey) -> str:
    chunk, microbatch, layer = sub
    return f"({chunk},{microbatch},{'rest' if layer is None else layer})"


# ---- expansion ---------------------------------------------------------------------------


def layers_of(layers_per_chunk: int | Sequence[int], chunk: int) -> int:
    """L_c: the transformer layers of model chunk ``chunk`` on this rank."""
    if isinstance(layers_per_chunk, int):
        count = layers_per_chunk
    else:
        if not 0 <= chunk < len(layers_per_chunk):
            raise ValueError(
                f"layers per chunk {list(layers_per_chunk)} has no entry for model chunk {chunk}")
        count = layers_per_chunk[chunk]
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"--layers-per-chunk {count!r} must be an integer >= 0 (chunk {chunk}; "
                         "0: the chunk's layers stream nothing, e.g. under full recompute)")
    return count


def _distance_of(reload_distance: Distance) -> Callable[[SubUnitKey], int]:
    if callable(reload_distance):
        return reload_distance
    if isinstance(reload_distance, Mapping):
        table = reload_distance
        return lambda sub: table.get(sub, 0)
    try:
        distance = operator.index(reload_distance)
    except TypeError:
        distance = -1
    if distance < 0:
        raise ValueError(
            f"reload distance {reload_distance!r} must be an integer >= 0 (compute entries)")
    return lambda sub: distance


def expand_rank(
    ops: Iterable,
    layers_per_chunk: int | Sequence[int],
    *,
    streamed: Iterable[UnitKey] = (),
    offloaded: Iterable[UnitKey] = (),
    reload_distance: Distance | Mapping[SubUnitKey, int] = 0,
) -> list[Op]:
    """One rank's layer-level order from its unit-level order ``ops`` (F/B; O/R are ignored).

    Forward of unit (c, m): ``F(c,m)``, then per layer l = 0..L_c-1 ``F(c,m,l)`` followed by
    ``O(c,m,l)`` when the unit streams and (l < L_c-1 or the unit is offloaded); after the layers
    ``O(c,m)`` when the unit is offloaded. Backward: ``B(c,m)``, then ``B(c,m,l)`` for l = L_c-1
    down to 0. A unit in ``offloaded`` (it has a lifespan: it leaves entirely) streams too.

    Each sub-unit with an O gets its R immediately before the compute entry ``d`` compute
    entries before its first use (the rest: ``B(c,m)``; layer l: ``B(c,m,l)``), d =
    ``reload_distance`` (an int, a mapping sub-unit -> int with default 0, or a callable);
    compute entries are the F and B entries of the expanded list, unit and layer level. If
    that point is not after the O with at least one compute entry in between, the sub-unit is
    not copied at all (its O is dropped): a copy out and back with nothing in between frees
    nothing. Several R at one point come in order of first use.
    """
    distance_of = _distance_of(reload_distance)
    streamed_set = set(streamed) | set(offloaded)
    offloaded_set = set(offloaded)
    compute = [op for op in ops if op.kind.compute]
    if any(op.layer is not None for op in compute):
        raise ValueError(
            "expand_rank takes a unit-level order (ops without a layer), not an expanded one")
    other = next((op for op in compute
                  if op.kind is not OpKind.FORWARD and op.kind is not OpKind.BACKWARD), None)
    if other is not None:
        raise ValueError(
            f"expand_rank has no layer expansion for op kind {other.kind.name} ({other})")
    seen_f: set[UnitKey] = set()
    seen_b: set[UnitKey] = set()
    for op in compute:
        unit = (op.chunk, op.microbatch)
        if op.kind is OpKind.FORWARD:
            if unit in seen_f:
                raise ScheduleError(f"unit {unit} has two forwards in this rank's order")
            seen_f.add(unit)
        else:
            if unit not in seen_f or unit in seen_b:
                raise ScheduleError(
                    f"backward of unit {unit} without a forward before it (or twice)")
            seen_b.add(unit)
    if seen_f != seen_b:
        raise ScheduleError(f"units without a backward: {sorted(seen_f - seen_b)}")

    # Pass 1: compute entries and every candidate O, with positions in compute-entry terms.
    body: list[Op] = []  # compute entries and O entries, no R yet
    compute_count = 0
    offload_after: dict[SubUnitKey, int] = {}  # sub-unit -> compute entries emitted before its O
    first_use: dict[SubUnitKey, int] = {}  # sub-unit -> compute position of its first use
    for op in compute:
        chunk, mb = op.chunk, op.microbatch
        layers = layers_of(layers_per_chunk, chunk)
        unit = (chunk, mb)
        if op.kind is OpKind.FORWARD:
            body.append(Op(OpKind.FORWARD, chunk, mb))
            compute_count += 1
            streams, leaves = unit in streamed_set, unit in offloaded_set
            for layer in range(layers):
                body.append(Op(OpKind.FORWARD, chunk, mb, layer))
                compute_count += 1
                if streams and (layer < layers - 1 or leaves):
                    body.append(Op(OpKind.OFFLOAD, chunk, mb, layer))
                    offload_after[(chunk, mb, layer)] = compute_count
            if leaves:
                body.append(Op(OpKind.OFFLOAD, chunk, mb))
                offload_after[(chunk, mb, None)] = compute_count
        else:
            first_use[(chunk, mb, None)] = compute_count
            body.append(Op(OpKind.BACKWARD, chunk, mb))
            compute_count += 1
            for layer in range(layers - 1, -1, -1):
                first_use[(chunk, mb, layer)] = compute_count
                body.append(Op(OpKind.BACKWARD, chunk, mb, layer))
                compute_count += 1

    # Pass 2: where each R goes (before compute position `at`); drop copies with nothing between.
    reload_at: dict[int, list[tuple[int, SubUnitKey]]] = {}
    kept: set[SubUnitKey] = set()
    for sub, after in offload_after.items():
        use = first_use[sub]
        distance = distance_of(sub)
        try:
            distance = operator.index(distance)  # ints, numpy integers
        except TypeError:
            distance = -1
        if distance < 0:
            raise ValueError(f"reload distance {distance_of(sub)!r} of sub-unit "
                             f"{sub_unit_text(sub)} must be an integer >= 0")
        at = use - distance
        if at <= after:  # not strictly after the O with a compute entry in between
            continue
        kept.add(sub)
        reload_at.setdefault(at, []).append((use, sub))

    out: list[Op] = []
    position = 0
    for entry in body:
        if entry.kind is OpKind.OFFLOAD:
            if entry.sub_unit in kept:
                out.append(entry)
            continue
        for _, (chunk, mb, layer) in sorted(reload_at.get(position, ()), key=lambda item: item[0]):
            out.append(Op(OpKind.RELOAD, chunk, mb, layer))
        out.append(entry)
        position += 1
    return out


def unit_lifespans(ops: Iterable) -> dict[UnitKey, int]:
    """Compute ops (unit level) between each unit's forward and its backward on this rank;
    a unit with lifespan 0 cannot leave entirely (it would have to come back at once)."""
    forward_at: dict[UnitKey, int] = {}
    lifespans: dict[UnitKey, int] = {}
    position = 0
    for op in ops:
        if not op.kind.compute or op.layer is not None:
            continue
        if op.kind is OpKind.FORWARD:
            forward_at[op.unit] = position
        elif op.kind is OpKind.BACKWARD:
            lifespans[op.unit] = position - forward_at[op.unit] - 1
        position += 1
    return lifespans


def stream_sets(ops: Iterable, chunks: int | None = None) -> tuple[set[UnitKey], set[UnitKey]]:
    """(streamed, offloaded) for the rule "units of chunks < K stream; those with a lifespan
    leave entirely" (``chunks`` None: every chunk)."""
    lifespans = unit_lifespans(ops)
    streamed = {unit for unit in lifespans if chunks is None or unit[0] < chunks}
    return streamed, {unit for unit in streamed if lifespans[unit] > 0}


@dataclass(frozen=True, slots=True)
class LayerSchedule:
    """Per-rank layer-level orders (what the runtime runs with layer streaming)."""

    ranks: tuple[tuple[Op, ...], ...]
    vpp: int
    microbatches: int
    layers: tuple
    """L_c per model chunk: one tuple for every rank, or one tuple per rank (uneven stages,
    e.g. Megatron's --decoder-first-pipeline-num-layers)."""
    kind: str = "custom"
    group_size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.ranks, tuple) or not all(
            isinstance(ops, tuple) for ops in self.ranks
        ):
            object.__setattr__(self, "ranks", tuple(tuple(ops) for ops in self.ranks))
        per_rank = bool(self.layers) and not isinstance(self.layers[0], int)
        layers = tuple(tuple(row) for row in self.layers) if per_rank else tuple(self.layers)
        if per_rank and all(row == layers[0] for row in layers):
            layers = layers[0]  # one shape: the compact form
        object.__setattr__(self, "layers", layers)
        for row in (layers if per_rank and isinstance(layers[0], tuple) else (layers,)):
            if len(row) != self.vpp:
                raise ValueError(f"layers per chunk {list(row)} must have one entry per model "
                                 f"chunk (vpp={self.vpp})")
        if self.layers and isinstance(self.layers[0], tuple) and len(self.layers) != self.pp:
            raise ValueError(f"layers per rank has {len(self.layers)} rows for {self.pp} ranks")

    @property
    def pp(self) -> int:
        return len(self.ranks)

    def layers_of_rank(self, rank: int) -> tuple[int, ...]:
        return (
            self.layers[rank] if self.layers and isinstance(self.layers[0], tuple) else self.layers
        )

    def to_text(self) -> str:
        if self.layers and isinstance(self.layers[0], tuple):
            layers = ";".join(",".join(map(str, row)) for row in self.layers)
        else:
            layers = ",".join(map(str, self.layers))
        header = (
            f"# megatron-offload layer-schedule kind={self.kind} pp={self.pp} vpp={self.vpp} "
            f"microbatches={self.microbatches} group_size={self.group_size} layers={layers}"
        )
        return "\n".join([header, *(",".join(map(str, ops)) for ops in self.ranks)]) + "\n"

    @classmethod
    def from_text(cls, text: str) -> "LayerSchedule":
        lines = [line.strip() for line in text.splitlines()]
        header = next((ln for ln in lines if ln.startswith("#")), None)
        if header is None:
            raise ScheduleError(
                "layer schedule text lacks its '# megatron-offload layer-schedule ...' header line")
        meta = dict(item.split("=", 1) for item in header.split() if "=" in item)
        try:
            vpp, microbatches = int(meta["vpp"]), int(meta["microbatches"])
            rows = [tuple(int(x) for x in row.split(",")) for row in meta["layers"].split(";")]
            layers = rows[0] if len(rows) == 1 else tuple(rows)
        except (KeyError, ValueError) as error:
            raise ScheduleError(
                f"layer schedule header needs vpp=, microbatches=, layers=: {header!r}") from error
        group = meta.get("group_size", "None")
        rows = [ln for ln in lines if ln and not ln.startswith("#")]
        ranks = tuple(tuple(Op.parse(cell) for cell in row.split(",") if cell.strip())
                      for row in rows)
        return cls(ranks, vpp, microbatches, layers, meta.get("kind", "custom"),
                   None if group == "None" else int(group))


def _per_rank(value, rank: int, pp: int, name: str):
    if (
        value is None
        or isinstance(value, (int, set, frozenset))
        or callable(value)
        or isinstance(value, Mapping)
    ):
        return value
    if len(value) != pp:
        raise ValueError(f"{name} has {len(value)} entries for {pp} ranks; give one per rank")
    return value[rank]


def expand_schedule(
    schedule: Schedule,
    layers_per_chunk: int | Sequence[int] | Sequence[Sequence[int]],
    streamed_per_rank: Sequence[Iterable[UnitKey]],
    offloaded_per_rank: Sequence[Iterable[UnitKey]],
    reload_distance: Distance | Sequence[Distance] = 0,
) -> LayerSchedule:
    """:func:`expand_rank` on every rank of ``schedule``. ``layers_per_chunk``: one number,
    one per model chunk, or one sequence per rank (uneven stages); ``reload_distance``: one
    value for all ranks (int, mapping or callable of the sub-unit) or a sequence of one per rank."""
    pp = schedule.pp
    if len(streamed_per_rank) != pp or len(offloaded_per_rank) != pp:
        raise ValueError(f"streamed/offloaded sets need one entry per rank ({pp})")
    if (
        not isinstance(layers_per_chunk, int)
        and layers_per_chunk
        and not isinstance(layers_per_chunk[0], int)
    ):
        if len(layers_per_chunk) != pp:
            raise ValueError(f"layers per chunk has {len(layers_per_chunk)} rows for {pp} ranks; "
                             "give one per rank")
        layers = tuple(tuple(layers_of(row, c) for c in range(schedule.vpp))
                       for row in layers_per_chunk)
    else:
        layers = (tuple(layers_of(layers_per_chunk, c) for c in range(schedule.vpp)),) * pp
    ranks = tuple(
        tuple(
            expand_rank(
                ops, layers[r], streamed=streamed_per_rank[r], offloaded=offloaded_per_rank[r],
                reload_distance=_per_rank(reload_distance, r, pp, "reload distance"),
            )
        )
        for r, ops in enumerate(schedule.ranks)
    )
    return LayerSchedule(ranks, schedule.vpp, schedule.microbatches, layers, schedule.kind,
                         schedule.group_size)


def copies_per_iteration(expanded: LayerSchedule | Sequence[Sequence[Op]]) -> list[int]:
    """Per rank, the D2H copies of one iteration (each has exactly one H2D copy back)."""
    ranks = expanded.ranks if isinstance(expanded, LayerSchedule) else expanded
    return [sum(1 for op in ops if op.kind is OpKind.OFFLOAD) for ops in ranks]


def diff_rank_ops(expected: Sequence[Op], actual: Sequence, context: int = 4) -> str:
    """'' when ``actual`` (ops or their text) is ``expected`` op for op, else where they
    first differ with a few entries of context: for checking the runtime's issued copies."""
    actual = [Op.parse(x) if isinstance(x, str) else x for x in actual]
    if list(expected) == actual:
        return ""
    step = next((i for i, (x, y) in enumerate(zip(expected, actual)) if x != y),
                min(len(expected), len(actual)))
    lo = max(0, step - context)
    show = lambda ops: " ".join(map(str, ops[lo : step + context + 1]))  # noqa: E731
    return (f"first difference at entry {step} ({len(expected)} expected, {len(actual)} issued)\n"
            f"  expected: {show(list(expected))}\n  issued:   {show(actual)}")


def check_rank(ops: Sequence[Op], *, strict: bool = True) -> None:
    """Raise ScheduleError unless every O has its R after it with a compute entry between
    them (``strict``: the rule of :func:`expand_rank`; the simulator also runs orders without
    it, e.g. :func:`unit_ops_to_layer_ops`) and before the sub-unit's first use, and nothing
    is copied twice."""
    offload_at: dict[SubUnitKey, tuple[int, int]] = {}
    reload_at: dict[SubUnitKey, tuple[int, int]] = {}
    computes = 0
    for index, op in enumerate(ops):
        sub = op.sub_unit
        kind = op.kind
        if kind.lane is Lane.D2H:
            if sub in offload_at:
                raise ScheduleError(
                    f"step {index}: {op} copies {sub_unit_text(sub)} out a second time")
            offload_at[sub] = (index, computes)
        elif kind.lane is Lane.H2D:
            if sub not in offload_at or sub in reload_at:
                raise ScheduleError(f"step {index}: {op} without an offload before it (or twice)")
            if strict and offload_at[sub][1] == computes:
                raise ScheduleError(
                    f"step {index}: {op} follows its offload with no compute entry in between")
            reload_at[sub] = (index, computes)
        else:  # compute
            if kind.needs_resident and sub in offload_at and sub not in reload_at:
                raise ScheduleError(
                    f"step {index}: {op} uses {sub_unit_text(sub)} before its reload")
            computes += 1
    missing = set(offload_at) - set(reload_at)
    if missing:
        raise ScheduleError("offloaded but never reloaded: "
                            f"{', '.join(map(sub_unit_text, sorted(missing, key=str)))}")


# ---- bytes, times and the link -------------------------------------------------------------


@dataclass(kw_only=True, frozen=True, slots=True)
class LayerProfile:
    """Bytes (and optionally times) of one rank's model chunks, per transformer layer.

    Index ``[c]`` = model chunk c on this rank, ``[c][l]`` = its layer l. Bytes are device
    bytes; a "transient" is the peak of live bytes above the level at the entry's start,
    reached while the entry runs (0 = the entry allocates nothing beyond what it keeps).
    Times are in any one unit (seconds with a link in bytes per second); None = 1 per layer
    forward, 2 per layer backward, 0 for the rest's entries.
    """

    rest_bytes: tuple[float, ...]
    """Bytes the rest of a unit (everything outside the transformer layers, plus the received
    input) keeps from the end of forward_step until the end of the unit's backward."""
    layer_bytes: tuple[tuple[float, ...], ...]
    """Bytes layer l's saved activations keep from the end of its forward to the end of its
    backward (minus any time spent on the host)."""
    forward_peak: tuple[tuple[float, ...], ...] | None = None
    """Transient of layer l's forward (default: layer_bytes, i.e. nothing beyond what it keeps)."""
    backward_peak: tuple[tuple[float, ...], ...] | None = None
    """Transient of layer l's backward (default 0)."""
    prologue_peak: tuple[float, ...] | None = None
    """Transient of the rest's forward before layer 0 (entry F(c,m)); default 0."""
    epilogue_peak: tuple[float, ...] | None = None
    """Transient of the rest's forward after the last layer (final norm, output layer, loss),
    counted after the last layer's offload is issued; default 0."""
    backward_rest_peak: tuple[float, ...] | None = None
    """Transient of the rest's backward before layer L-1's backward (entry B(c,m)); default 0."""
    base_bytes: float = 0.0
    """Bytes resident all iteration long on this rank (p2p buffers, ...); added to every level."""
    entry_effects: Mapping | None = None
    """Measured ``(transient, change)`` of individual entries, keyed ``(kind, chunk,
    microbatch, layer)`` (kind ``EPILOGUE`` for the rest's forward after the last layer):
    they replace the per-chunk rule for those entries. A profile measured on a run without
    offload (``testing/vs_megatron``) gives every entry, so the simulator replays that run
    and adds what the copies change."""
    moved_bytes: Mapping | None = None
    """Measured bytes each sub-unit ``(chunk, microbatch, layer)`` moves per copy (what its
    O frees and its R brings back), replacing ``sub_unit_bytes`` for copies."""
    forward_time: tuple[tuple[float, ...], ...] | None = None
    backward_time: tuple[tuple[float, ...], ...] | None = None
    prologue_time: tuple[float, ...] | None = None
    epilogue_time: tuple[float, ...] | None = None
    backward_rest_time: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        def norm(name, nested):
            value = getattr(self, name)
            if value is None:
                return
            value = (
                tuple(tuple(float(x) for x in row) for row in value)
                if nested
                else tuple(float(x) for x in value)
            )
            object.__setattr__(self, name, value)

        norm("rest_bytes", False)
        norm("layer_bytes", True)
        for name in ("forward_peak", "backward_peak", "forward_time", "backward_time"):
            norm(name, True)
        for name in ("prologue_peak", "epilogue_peak", "backward_rest_peak", "prologue_time",
                     "epilogue_time", "backward_rest_time"):
            norm(name, False)
        chunks = len(self.layer_bytes)
        if len(self.rest_bytes) != chunks:
            raise ValueError(f"rest_bytes has {len(self.rest_bytes)} chunks, layer_bytes {chunks}; "
                             "give one per model chunk")
        shape = [len(row) for row in self.layer_bytes]
        for name in ("forward_peak", "backward_peak", "forward_time", "backward_time"):
            value = getattr(self, name)
            if value is not None and [len(row) for row in value] != shape:
                raise ValueError(
                    f"{name} must have the shape of layer_bytes ({shape} layers per chunk)")
        for name in ("prologue_peak", "epilogue_peak", "backward_rest_peak", "prologue_time",
                     "epilogue_time", "backward_rest_time"):
            value = getattr(self, name)
            if value is not None and len(value) != chunks:
                raise ValueError(
                    f"{name} has {len(value)} entries; give one per model chunk ({chunks})")
        values = [*self.rest_bytes, *(x for row in self.layer_bytes for x in row)]
        if any(not (x >= 0 and math.isfinite(x)) for x in values):
            raise ValueError("profile bytes must be finite and >= 0")

    @classmethod
    def uniform(cls, vpp: int, layers: int | Sequence[int], layer_bytes: float,
                rest_bytes: float = 0.0, *, forward_time: float = 1.0, backward_time: float = 2.0,
                forward_peak: float | None = None, backward_peak: float = 0.0,
                **extra) -> "LayerProfile":
        """Every layer alike: ``layer_bytes`` kept, ``forward_time``/``backward_time`` per layer."""
        counts = [layers_of(layers, c) for c in range(vpp)]
        grid = lambda x: tuple((x,) * n for n in counts)  # noqa: E731
        return cls(rest_bytes=(rest_bytes,) * vpp, layer_bytes=grid(layer_bytes),
                   forward_peak=grid(layer_bytes if forward_peak is None else forward_peak),
                   backward_peak=grid(backward_peak), forward_time=grid(forward_time),
                   backward_time=grid(backward_time), **extra)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(len(row) for row in self.layer_bytes)

    def unit_bytes(self, chunk: int) -> float:
        """Bytes one whole unit of ``chunk`` keeps (the rest plus every layer)."""
        return self.rest_bytes[chunk] + sum(self.layer_bytes[chunk])

    def sub_unit_bytes(self, chunk: int, layer: int | None, microbatch: int | None = None) -> float:
        if self.moved_bytes is not None and microbatch is not None:
            moved = self.moved_bytes.get((chunk, microbatch, layer))
            if moved is not None:
                return moved
        return self.rest_bytes[chunk] if layer is None else self.layer_bytes[chunk][layer]

    def _get(self, name: str, chunk: int, layer: int | None = None, default: float = 0.0) -> float:
        value = getattr(self, name)
        if value is None:
            return default
        return value[chunk] if layer is None else value[chunk][layer]

    def duration(self, op: Op) -> float:
        """Compute time of a compute entry (the epilogue: :meth:`epilogue_duration`)."""
        chunk, layer = op.chunk, op.layer
        if op.kind is OpKind.FORWARD:
            if layer is None:
                return self._get("prologue_time", chunk)
            return self._get("forward_time", chunk, layer, 1.0)
        if op.kind is OpKind.BACKWARD:
            if layer is None:
                return self._get("backward_rest_time", chunk)
            return self._get("backward_time", chunk, layer, 2.0)
        raise ValueError(f"the layer profile has no compute time for {op} (op kind {op.kind.name})")

    def epilogue_duration(self, chunk: int) -> float:
        return self._get("epilogue_time", chunk)

    def check_layers(self, layers: Sequence[int]) -> None:
        if tuple(layers) != self.layers:
            raise ValueError(f"the profile has {list(self.layers)} layers per chunk, the schedule "
                             f"{list(layers)}")


EPILOGUE = "E"
"""Kind of the epilogue pseudo-entry in :func:`memory_effect` (no IR entry of its own: it runs
right after the last forward entry of its unit, before ``O(c,m)``); no op kind has its letter."""
assert EPILOGUE not in {kind.value for kind in OpKind}


def memory_effect(kind: OpKind | str, chunk: int, layer: int | None, profile: LayerProfile,
                  microbatch: int | None = None) -> tuple[float, float]:
    """The memory rule, in one place: ``(transient, change)`` of one entry.

    ``transient``: bytes above the level at the entry's start reached while it runs (compute
    only); ``change``: what the entry adds to (or, negative, removes from) the level when it
    ends (compute), when its copy completes (O, link model; at issue when synchronous) or when
    its copy starts (R). ``kind`` ``EPILOGUE`` is the rest's forward after the last layer.

    - F(c,m): prologue_peak, 0 (the rest's bytes are added at the forward's end: epilogue);
    - F(c,m,l): forward_peak[l], +layer_bytes[l];
    - epilogue: epilogue_peak, +rest_bytes;
    - O: 0, -bytes of the sub-unit; R: 0, +bytes;
    - B(c,m): backward_rest_peak, 0;
    - B(c,m,l): backward_peak[l], -layer_bytes[l] (l = 0 also releases the rest: the end of
      the unit's backward).
    """
    p = profile
    copy = kind.lane if isinstance(kind, OpKind) else None
    if p.entry_effects is not None and microbatch is not None and copy is None:
        measured = p.entry_effects.get((kind, chunk, microbatch, layer))
        if measured is not None:
            return measured
    if kind == EPILOGUE:
        return p._get("epilogue_peak", chunk), p.rest_bytes[chunk]
    if kind is OpKind.FORWARD:
        if layer is None:
            return p._get("prologue_peak", chunk), 0.0
        return (p._get("forward_peak", chunk, layer, p.layer_bytes[chunk][layer]),
                p.layer_bytes[chunk][layer])
    if kind is OpKind.BACKWARD:
        if layer is None:
            return p._get("backward_rest_peak", chunk), 0.0
        release = p.layer_bytes[chunk][layer] + (p.rest_bytes[chunk] if layer == 0 else 0.0)
        return p._get("backward_peak", chunk, layer), -release
    if copy is None:
        raise ValueError(f"the memory rule has no entry for op kind {kind!r}")
    moved = p.sub_unit_bytes(chunk, layer, microbatch)
    return 0.0, (-moved if copy is Lane.D2H else moved)


@dataclass(kw_only=True, frozen=True, slots=True)
class LinkModel:
    """The host link of one rank: a D2H and an H2D lane (separate streams, full duplex), each
    FIFO; bandwidths in bytes per time unit of the profile."""

    d2h_bytes_per_time: float
    h2d_bytes_per_time: float | None = None
    """Default: the D2H bandwidth."""
    latency: float = 0.0
    """Fixed time per copy."""
    shared: bool = False
    """Ranks 2i and 2i+1 share one lane pair (GPUs behind one PCIe switch)."""

    def __post_init__(self) -> None:
        if not self.d2h_bytes_per_time > 0 or (self.h2d_bytes_per_time is not None
                                               and not self.h2d_bytes_per_time > 0):
            raise ValueError(f"link bandwidths must be > 0 (got {self.d2h_bytes_per_time}, "
                             f"{self.h2d_bytes_per_time})")
        if self.latency < 0:
            raise ValueError(f"link latency {self.latency} must be >= 0")

    def d2h_time(self, nbytes: float) -> float:
        return self.latency + nbytes / self.d2h_bytes_per_time

    def h2d_time(self, nbytes: float) -> float:
        return self.latency + nbytes / (self.h2d_bytes_per_time or self.d2h_bytes_per_time)

    def lane_of(self, rank: int) -> int:
        return rank // 2 if self.shared else rank


def forward_ends(ops: Sequence[Op]) -> set[int]:
    """Indices of the entries after which each unit's epilogue runs (forward_step's end): the
    unit's last layer forward F(c,m,L-1), or the O of that layer when it directly follows
    (layer streaming issues it before the epilogue). Copies issued after that entry (O(c,m),
    or a whole unit's copies in :func:`unit_ops_to_layer_ops`) run after the epilogue."""
    ends: dict[UnitKey, int] = {}
    for index, op in enumerate(ops):
        if op.layer is not None and op.kind is OpKind.FORWARD:
            following = ops[index + 1] if index + 1 < len(ops) else None
            if (
                following is not None
                and following.kind is OpKind.OFFLOAD
                and following.sub_unit == op.sub_unit
            ):
                index += 1
            ends[op.unit] = index
    return set(ends.values())


def unit_ops_to_layer_ops(ops: Iterable, layers_per_chunk: int | Sequence[int]) -> list[Op]:
    """A unit-granularity order (F, B and the runtime's whole-unit O, R: e.g.
    ``schedule.layers.runtime_rank_ops``) in layer terms, to score it with the same profile and
    simulator as layer streaming: F(c,m) and B(c,m) gain their layer entries; a unit's O
    becomes O(c,m) then O(c,m,0..L-1) (after forward_step, so after the epilogue), its R
    becomes R(c,m) then R(c,m,L-1..0) (everything back before B(c,m)). On a link the unit's
    copy runs as L+1 back-to-back copies on the lane (the same time without latency), which
    frees its bytes layer by layer rather than all at the end: slightly optimistic."""
    out: list[Op] = []
    for op in ops:
        chunk, mb = op.chunk, op.microbatch
        if op.layer is not None:
            raise ValueError(f"{op} is already a layer-level entry")
        layers = range(layers_of(layers_per_chunk, chunk))
        if op.kind is OpKind.FORWARD or op.kind is OpKind.OFFLOAD:
            order = layers  # in the forward's layer order
        elif op.kind is OpKind.BACKWARD or op.kind is OpKind.RELOAD:
            order = reversed(layers)  # in the backward's
        else:
            raise ValueError(f"no layer-level form of {op} (op kind {op.kind.name})")
        out.append(Op(op.kind, chunk, mb))
        out += [Op(op.kind, chunk, mb, layer) for layer in order]
    return out


def reload_distances_for_link(
    ops: Sequence[Op], profile: LayerProfile, link: LinkModel | None, *, timing=None,
    drop_unhidden: bool = False,
) -> dict[SubUnitKey, int]:
    """Per offloaded sub-unit of one rank's expanded order, the smallest reload distance whose
    reload still ends before its first use: "as late as the link allows".

    ``ops``: an expansion with any distance (its O entries name the candidates; expand with
    distance 0 to offer every one). Compute entries run back to back with the profile's times
    (no pipeline waits, no stalls). Offloads run FIFO on the D2H lane from their issue (the
    end of the compute entry before them; the rest's after the epilogue). Reloads run FIFO on
    the H2D lane in order of first use and are planned backwards from the last: each ends by
    its first use and by the start of the next one, and starts after its own offload ended.
    A reload that cannot be hidden gets the largest legal distance (one compute entry after
    its O: it stalls, and the simulator says by how much), or with ``drop_unhidden`` a
    distance that drops the sub-unit's copies altogether (one pass: the lanes are not
    re-planned without them). Synchronous copies (``link`` None: CPU backend) give 0.

    ``timing``: a ``layer_sim.LayerSimulation`` of the same rank's compute entries (e.g. of
    ``ops`` with synchronous copies, from ``simulate_layer_schedule``): its compute times,
    pipeline waits included, replace the back-to-back ones.
    """
    subs = [op.sub_unit for op in ops if op.kind is OpKind.OFFLOAD]
    if link is None:
        return {sub: 0 for sub in subs}
    epilogue_after = forward_ends(ops)
    starts: list[float] = []  # start time of compute position p
    finishes: list[float] = []  # end time of compute position p (plus a following epilogue)
    offload_after: dict[SubUnitKey, int] = {}
    first_use: dict[SubUnitKey, int] = {}
    epilogue: dict[int, float] = {}  # compute position -> epilogue time after it
    t = 0.0
    for index, op in enumerate(ops):
        if op.kind.compute:
            if op.kind.needs_resident:
                first_use.setdefault(op.sub_unit, len(starts))
            starts.append(t)
            t += profile.duration(op)
            finishes.append(t)
        elif op.kind is OpKind.OFFLOAD:
            offload_after[op.sub_unit] = len(starts)
        if index in epilogue_after:
            epilogue[len(starts) - 1] = profile.epilogue_duration(op.chunk)
            t += epilogue[len(starts) - 1]
    if timing is not None:
        pairs = [(begin, end) for op, begin, end in zip(timing.ops, timing.start, timing.end)
                 if op.is_compute]
        if len(pairs) != len(starts):
            raise ValueError(f"timing has {len(pairs)} compute entries, the order {len(starts)}: "
                             "not the same rank's order")
        starts = [begin for begin, _ in pairs]
        finishes = [end for _, end in pairs]
    # The D2H lane, FIFO in list order.
    offload_end: dict[SubUnitKey, float] = {}
    free = 0.0
    for op in ops:
        if op.kind is OpKind.OFFLOAD:
            after = offload_after[op.sub_unit]
            issue = finishes[after - 1] if after else 0.0
            if op.layer is None:
                issue += epilogue.get(after - 1, 0.0)
            free = max(issue, free) + link.d2h_time(
                profile.sub_unit_bytes(op.chunk, op.layer, op.microbatch)
            )
            offload_end[op.sub_unit] = free
    distances: dict[SubUnitKey, int] = {}
    later_start = math.inf  # the ALAP start of the next reload on the H2D lane
    later_at = len(starts)
    for sub in sorted(subs, key=lambda s: first_use[s], reverse=True):
        use = first_use[sub]
        finish = min(starts[use], later_start)
        begin = finish - link.h2d_time(profile.sub_unit_bytes(sub[0], sub[2], sub[1]))
        at = min(bisect.bisect_right(starts, begin) - 1, use, later_at)
        earliest = offload_after[sub] + 1  # the first point with a compute entry after the O
        if at < earliest or begin < offload_end[sub]:
            if drop_unhidden:
                distances[sub] = use + 1  # before the first entry: never after the O, dropped
                continue
            at = max(at, earliest)  # as early as allowed (it stalls), or dropped if none
        later_at = min(later_at, at)
        later_start = min(later_start, begin)
        distances[sub] = max(0, use - at)
    return distances


def runtime_rank_ops(order: Sequence[Op], offload: set[UnitKey],
                     prefetch_distance: int = 1) -> list[Op]:
    """One rank's ops with offload/reload inserted where the runtime issues them.

    The runtime (``runtime/offloader.py``) starts a unit's offload right after its forward and
    its reload when the op ``prefetch_distance`` places before the unit's backward starts. A
    unit whose reload would start right after its offload, with no op between them, is not
    offloaded: the copy would come back before anything could use the memory it freed. The
    same rule as data (:func:`expand_rank` with no layers), so the simulator
    and the renderer score the schedule that runs.
    """
    return expand_rank(order, 0, streamed=offload, offloaded=offload,
                       reload_distance=prefetch_distance)
