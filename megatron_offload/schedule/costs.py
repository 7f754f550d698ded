"""The cost model the simulator and the offload pass share. Times are in any one unit."""
from __future__ import annotations

from dataclasses import dataclass

from .kinds import OpKind


def _per_chunk(value: float | tuple[float, ...], chunk: int) -> float:
    return value[chunk] if isinstance(value, tuple) else value


@dataclass(kw_only=True, slots=True, frozen=True)
class CostModel:
    forward_time: float | tuple[float, ...] = 1.0
    """Forward time of one unit (--forward-time); a tuple gives one value per model chunk."""
    backward_time: float | tuple[float, ...] = 2.0
    """Backward time of one unit (--backward-time); a tuple gives one value per model chunk."""
    p2p_latency: float = 0.0
    """Time from the end of an op to its output being usable on the next rank."""
    offload_ratio: float = 1.0
    """k = (D2H + H2D time of one unit) / (forward + backward time of one unit)
    (--offload-ratio): the host link's speed relative to compute. k <= 1 hides full offload
    in the ideal case."""
    offload_share: float = 0.5
    """Share of the round trip spent on the D2H copy (the rest is H2D); 0.5 = symmetric link."""
    shared_link: bool = False
    """Ranks 2i and 2i+1 share one D2H and one H2D lane (GPUs behind one PCIe switch)."""

    def __post_init__(self) -> None:
        for name in ("forward_time", "backward_time"):
            value = getattr(self, name)
            values = value if isinstance(value, tuple) else (value,)
            if not values or any(not x > 0 for x in values):
                flag = "--" + name.replace("_", "-")
                raise ValueError(
                    f"{flag} {value!r} must be > 0 (one value, or one per model chunk)")
        if self.p2p_latency < 0:
            raise ValueError(f"--p2p-latency {self.p2p_latency} must be >= 0")
        if self.offload_ratio < 0:
            raise ValueError(f"--offload-ratio {self.offload_ratio} must be >= 0 (0 = an "
                             "infinitely fast host link)")
        if not 0 <= self.offload_share <= 1:
            raise ValueError(f"{self.offload_share=} must lie in [0, 1]")

    def check_chunks(self, vpp: int) -> None:
        for name in ("forward_time", "backward_time"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != vpp:
                raise ValueError(f"--{name.replace('_', '-')} has {len(value)} per-chunk values "
                                 f"but --vpp is {vpp}; give one value or {vpp}")

    def forward(self, chunk: int) -> float:
        return _per_chunk(self.forward_time, chunk)

    def backward(self, chunk: int) -> float:
        return _per_chunk(self.backward_time, chunk)

    def round_trip(self, chunk: int) -> float:
        return self.offload_ratio * (self.forward(chunk) + self.backward(chunk))

    def offload(self, chunk: int) -> float:
        """D2H time of one unit of ``chunk``."""
        return self.round_trip(chunk) * self.offload_share

    def reload(self, chunk: int) -> float:
        """H2D time of one unit of ``chunk``."""
        return self.round_trip(chunk) * (1.0 - self.offload_share)

    def time(self, kind: OpKind, chunk: int) -> float:
        """Duration of one unit's op of ``kind`` on model chunk ``chunk`` (a copy: on its lane)."""
        cost = _TIME_OF.get(kind)
        if cost is None:
            raise ValueError(f"the cost model has no time for op kind {kind.name} "
                             f"({kind.value!r}); add it to costs._TIME_OF")
        return cost(self, chunk)

    def link_of(self, rank: int) -> int:
        """The lane pair a rank's copies use."""
        return rank // 2 if self.shared_link else rank


_TIME_OF = {
    OpKind.FORWARD: CostModel.forward,
    OpKind.BACKWARD: CostModel.backward,
    OpKind.OFFLOAD: CostModel.offload,
    OpKind.RELOAD: CostModel.reload,
}
"""The cost of each op kind (one entry per row of the kinds table)."""
