"""A measured :class:`~megatron_offload.schedule.layers.LayerProfile` for one rank.

Input: the segments of a run without offload cut at every entry of the layer-level list
(``vs_megatron.measure(..., variant="profile")``: ``TruePeakMeter.mark``), and the bytes each
sub-unit moved per copy in the offload run (its ``IterationStats.copies``). Output: a profile
whose entries carry their measured (transient, change), so the schedule simulator replays
the run without offload entry by entry and adds what the copies of a runtime list change:
the prediction the benchmark compares with the measured true peak.

Segments map onto the simulator's entries as follows (``after:X`` runs from X's end to the
next mark): ``cFm`` the prologue; ``cFm.l`` + ``after:cFm.l`` layer l's forward, except
after the last layer, where ``after:cFm.L-1`` (final norm, output layer, loss) and
``after:cFm`` (the step's end and the p2p that follows) are the epilogue; ``cBm`` the rest's
backward; ``cBm.l`` layer l's backward, the last one with ``after:cBm`` (the unit's end and
its p2p).
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence

from megatron_offload.schedule.ir import Op
from megatron_offload.schedule.kinds import OpKind
from megatron_offload.schedule.layers import EPILOGUE, LayerProfile


def _fold(effect: tuple[float, float], start: float, peak: float,
          end: float) -> tuple[float, float]:
    transient, change = effect
    return max(transient, change + peak - start), change + end - start


def entry_effects(segments: Sequence[tuple[str, int, int, int]]) -> tuple[dict, float, dict]:
    """({(kind, chunk, microbatch, layer): (transient, change)}, level at the first mark,
    {chunk: layers seen})."""
    layers: dict[int, int] = {}
    for label, *_ in segments:
        name = label.removeprefix("after:")
        op = Op.parse(name)
        if op.layer is not None:
            layers[op.chunk] = max(layers.get(op.chunk, 0), op.layer + 1)
    effects: dict = {}
    current = None
    for label, start, peak, end in segments:
        after = label.startswith("after:")
        op = Op.parse(label.removeprefix("after:"))
        if not after:
            current = (op.kind, op.chunk, op.microbatch, op.layer)
            effects[current] = (peak - start, end - start)
            continue
        if (op.kind is OpKind.FORWARD and op.layer is not None
                and op.layer == layers.get(op.chunk, 0) - 1):
            current = (EPILOGUE, op.chunk, op.microbatch, None)  # the rest's forward begins
            effects[current] = (peak - start, end - start)
        elif op.kind is OpKind.FORWARD and op.layer is None and layers.get(op.chunk, 0):
            current = (EPILOGUE, op.chunk, op.microbatch, None)
            effects[current] = _fold(effects[current], start, peak, end)
        else:  # the gap after a layer, or after a step without layers: the entry before it
            effects[current] = _fold(effects[current], start, peak, end)
    base = segments[0][1] if segments else 0.0
    return effects, float(base), layers


def moved_bytes(copies: Sequence) -> dict:
    """{(chunk, microbatch, layer): bytes} from ``IterationStats.copies``."""
    out = {}
    for text, nbytes, *_ in copies:
        unit, _, layer = text.partition(".")
        chunk, microbatch = (int(x) for x in unit.split(","))
        out[(chunk, microbatch, int(layer) if layer else None)] = float(nbytes)
    return out


def measured_profile(segments, copies, vpp: int) -> LayerProfile:
    """Every entry measured (see the module docstring)."""
    effects, base, layers = entry_effects(segments)
    counts = [layers.get(c, 0) for c in range(vpp)]
    return LayerProfile(rest_bytes=(0.0,) * vpp, layer_bytes=tuple((0.0,) * n for n in counts),
                        base_bytes=base, entry_effects=effects, moved_bytes=moved_bytes(copies))


def per_chunk_profile(segments, copies, vpp: int) -> LayerProfile:
    """The planner's kind of profile: one value per (chunk, layer), the median over
    microbatches of the measured entries (no per-entry effects)."""
    effects, base, layers = entry_effects(segments)
    counts = [layers.get(c, 0) for c in range(vpp)]
    moved = moved_bytes(copies)

    def median(kind, chunk, layer, index, default=0.0):
        values = [v[index] for (k, c, _, entry_layer), v in effects.items()
                  if k == kind and c == chunk and entry_layer == layer]
        return statistics.median(values) if values else default

    def moved_median(chunk, layer, fallback):
        values = [b for (c, _, copy_layer), b in moved.items()
                  if c == chunk and copy_layer == layer]
        return statistics.median(values) if values else fallback

    F, B = OpKind.FORWARD, OpKind.BACKWARD
    layer_bytes = tuple(
        tuple(moved_median(c, layer, median(F, c, layer, 1)) for layer in range(counts[c]))
        for c in range(vpp)
    )
    rest = tuple(moved_median(c, None, median(EPILOGUE, c, None, 1) + median(F, c, None, 1))
                 for c in range(vpp))
    return LayerProfile(
        rest_bytes=rest, layer_bytes=layer_bytes,
        forward_peak=tuple(
            tuple(median(F, c, layer, 0) for layer in range(counts[c])) for c in range(vpp)
        ),
        backward_peak=tuple(
            tuple(median(B, c, layer, 0) for layer in range(counts[c])) for c in range(vpp)
        ),
        prologue_peak=tuple(median(F, c, None, 0) for c in range(vpp)),
        epilogue_peak=tuple(median(EPILOGUE, c, None, 0) for c in range(vpp)),
        backward_rest_peak=tuple(median(B, c, None, 0) for c in range(vpp)),
        base_bytes=base)


__all__ = ["entry_effects", "moved_bytes", "measured_profile", "per_chunk_profile"]
