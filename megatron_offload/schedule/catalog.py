"""The schedule kinds by name: one place that maps ``--schedule`` to a generator."""
from __future__ import annotations

from typing import Literal, get_args

from .gis import check_gis_args, gis_schedule
from .ir import Schedule
from .megatron import check_megatron_args, megatron_schedule

ScheduleKind = Literal["1f1b", "interleaved", "gis"]
SCHEDULE_KINDS: tuple[str, ...] = get_args(ScheduleKind)


def check_schedule_args(kind: str, pp: int, vpp: int, microbatches: int,
                        group_size: int | None) -> int | None:
    """Validate before any work; returns the group size in effect (None for 1f1b)."""
    if kind == "gis":
        return check_gis_args(pp, vpp, microbatches, group_size)
    if kind in ("1f1b", "interleaved"):
        group = check_megatron_args(kind, pp, vpp, microbatches, group_size)
        return None if kind == "1f1b" else group
    raise ValueError(f"--schedule {kind!r} is unknown; choose one of {', '.join(SCHEDULE_KINDS)}")


def make_schedule(kind: ScheduleKind, pp: int, vpp: int, microbatches: int,
                  group_size: int | None = None) -> Schedule:
    check_schedule_args(kind, pp, vpp, microbatches, group_size)
    if kind == "gis":
        return gis_schedule(pp, vpp, microbatches, group_size)
    return megatron_schedule(kind, pp, vpp, microbatches, group_size)
