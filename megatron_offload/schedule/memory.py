"""Memory of a simulated schedule in bytes rather than units (pure Python + numpy, no torch).

The simulator counts units (one chunk's activations for one microbatch). A planner needs bytes,
and units differ: the first stage's chunk 0 also keeps the embedding's tensors, the last stage's
last chunk the loss's, and an offloaded unit leaves its small tensors on the device. Given the
bytes of a unit of each (rank, chunk), these functions sweep the same events as the simulator:

- device: a unit holds ``total`` bytes from the start of its forward to the end of its
  backward, except while offloaded: from the end of its offload copy to the start of its reload
  it holds only ``total - moved`` (what the runtime keeps on the device);
- host: an offloaded unit holds ``moved`` bytes of host memory from the start of its offload copy
  to the end of its reload (the host buffer is taken when the copy starts and returned when the
  reload has finished).
At equal times releases count before reservations (the simulator's convention), so with equal
weights the device peak is ``peak_units x bytes``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .kinds import Lane, OpKind
from .simulate import Simulation


def _peak(times: list[np.ndarray], deltas: list[np.ndarray]) -> float:
    if not times:
        return 0.0
    time = np.concatenate(times)
    delta = np.concatenate(deltas)
    order = np.lexsort((delta, time))  # by time, then releases (negative) first
    level = np.cumsum(delta[order])
    return float(max(0.0, level.max(initial=0.0)))


def byte_peaks(sim: Simulation, total: Sequence[Sequence[float]],
               moved: Sequence[Sequence[float]] | None = None) -> tuple[list[float], list[float]]:
    """Per rank, the peak device bytes and the peak host bytes of ``sim``'s schedule.

    ``total[r][c]``: bytes of one unit of model chunk ``c`` on rank ``r``; ``moved[r][c]``:
    the part of it an offload moves (default: all of it). Host peaks are 0 without offload.
    """
    schedule = sim.schedule
    units, m = schedule.units_per_rank, schedule.microbatches
    programs = schedule.program()
    device, host = [], []
    for rank in range(schedule.pp):
        codes = np.asarray(programs[rank], dtype=np.int64)
        start = np.asarray(sim.start[rank], dtype=float)
        end = np.asarray(sim.end[rank], dtype=float)
        kind, unit = np.divmod(codes, units)
        chunk = unit // m
        weight = np.asarray(total[rank], dtype=float)[chunk]
        move = weight if moved is None else np.asarray(moved[rank], dtype=float)[chunk]
        # Per the kinds table: a kind that allocates adds its bytes at the op's start, one that
        # frees removes them at its end (compute: the whole unit; a copy: what it moves); a
        # D2H copy holds host memory from its start, an H2D copy returns it at its end.
        times, deltas, host_times, host_deltas = [], [], [], []
        copies_out = False
        for op_kind in OpKind:
            mine = kind == op_kind.code
            amount = weight if op_kind.compute else move
            if op_kind.allocates:
                times.append(start[mine])
                deltas.append(amount[mine])
            if op_kind.frees:
                times.append(end[mine])
                deltas.append(-amount[mine])
            if op_kind.lane is Lane.D2H:
                host_times.append(start[mine])
                host_deltas.append(move[mine])
                copies_out = copies_out or bool(np.any(mine))
            elif op_kind.lane is Lane.H2D:
                host_times.append(end[mine])
                host_deltas.append(-move[mine])
        device.append(_peak(times, deltas))
        host.append(_peak(host_times, host_deltas) if copies_out else 0.0)
    return device, host
