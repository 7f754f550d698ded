"""The op kinds of the schedule IR: one row per kind, everything the passes know about it.

Pure Python, no torch, no imports from the rest of the package. Every consumer reads a kind's
properties from its row instead of branching on which kind it is: the validator (the order of
a unit's ops, the p2p channels), the p2p plan (who sends what to whom), the simulators (what
waits for what, what takes and frees memory, which link lane a copy uses) and the runtime
executor (which handler runs it, which op does the gradient sync). Adding a kind is adding a
row here (:class:`OpKind`) plus its handlers where it runs (``runtime/executor.py``) and its
time where it is simulated (``costs.CostModel.time``); a consumer meeting a kind it has no
rule for raises an error naming the kind, it never treats it as another kind.

``docs/schedule-ir.md`` shows :func:`kinds_table` (a test keeps the two equal).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, fields


class Flow(enum.Enum):
    """Which way a compute op's output travels through the pipeline (its input comes the other
    way): downstream to the next virtual stage (activations, the forward pass) or upstream to
    the previous one (gradients, the backward pass)."""

    DOWNSTREAM = (1, "activation")
    UPSTREAM = (-1, "gradient")

    def __init__(self, step: int, payload: str) -> None:
        self.step = step
        """+1: to the next virtual stage; -1: to the previous one."""
        self.payload = payload
        """What the message carries, in words (singular)."""

    @property
    def opposite(self) -> "Flow":
        return Flow.UPSTREAM if self is Flow.DOWNSTREAM else Flow.DOWNSTREAM


class Lane(enum.Enum):
    """The host-link lane a copy runs on (one stream per direction)."""

    D2H = "d2h"
    H2D = "h2d"


@dataclass(frozen=True, slots=True)
class KindSpec:
    """One row of the op-kind table. "The unit" is the op's (model chunk, microbatch) unit, or
    its layer sub-unit in a layer-level list; "its activations" are what the unit's forward
    saved for the backward."""

    letter: str
    """The kind in the text form (``0F3``): one capital letter, unique."""
    word: str
    """The kind in messages ("forward")."""
    lane: Lane | None
    """None: a compute op, on the compute stream. Otherwise an asynchronous copy of the unit's
    activations on this lane, issued where it stands in the list."""
    sends: Flow | None
    """Where the op's output goes by p2p (its input comes from the other side, from the op of
    the same kind on the neighbouring virtual stage); None: no p2p. The forward pass is the
    kinds sending downstream."""
    after: tuple[str, ...]
    """Letters of the kinds one of which must be the unit's previous op on its rank; empty:
    the unit's first op. Each kind runs at most once per unit."""
    closes: bool
    """The unit's last op: every unit of every rank ends with a kind that closes."""
    allocates: bool
    """The unit's activations take device memory from the op's start (compute: all of them;
    a copy: the part it moves)."""
    frees: bool
    """The unit's activations leave the device at the op's end."""
    needs_resident: bool
    """The op reads the unit's activations: if they were copied out, it waits for the copy back."""
    weight_grads: bool
    """The op accumulates parameter gradients: a chunk's data-parallel gradient sync goes with
    its last op of this kind."""
    nominal_time: float
    """Time of the op where no cost model is given (the p2p plan's dry run); copies take none."""

    @property
    def compute(self) -> bool:
        return self.lane is None


class OpKind(str, enum.Enum):
    """The kinds, one :class:`KindSpec` row each. A member is its letter (``OpKind("F")``,
    ``kind.value == "F"``) and carries its row's fields as attributes (``kind.sends``,
    ``kind.compute``, ...), its row (``kind.spec``) and its integer code (``kind.code``: its
    position here, used by the numpy engines: op code = code * units + unit). Compute kinds
    come first, so compute ops have the codes below ``len(COMPUTE_KINDS) * units``."""

    def __new__(cls, spec: KindSpec) -> "OpKind":
        member = str.__new__(cls, spec.letter)
        member._value_ = spec.letter
        member.spec = spec
        for item in fields(spec):
            setattr(member, item.name, getattr(spec, item.name))
        member.compute = spec.compute
        return member

    FORWARD = KindSpec(
        "F", "forward", lane=None, sends=Flow.DOWNSTREAM, after=(), closes=False,
        allocates=True, frees=False, needs_resident=False, weight_grads=False, nominal_time=1.0)
    BACKWARD = KindSpec(
        "B", "backward", lane=None, sends=Flow.UPSTREAM, after=("F", "R"), closes=True,
        allocates=False, frees=True, needs_resident=True, weight_grads=True, nominal_time=2.0)
    OFFLOAD = KindSpec(  # device -> host copy of a unit's activations, after its forward
        "O", "offload", lane=Lane.D2H, sends=None, after=("F",), closes=False,
        allocates=False, frees=True, needs_resident=False, weight_grads=False, nominal_time=0.0)
    RELOAD = KindSpec(  # host -> device copy, before its backward
        "R", "reload", lane=Lane.H2D, sends=None, after=("O",), closes=False,
        allocates=True, frees=False, needs_resident=False, weight_grads=False, nominal_time=0.0)


for _code, _kind in enumerate(OpKind):
    _kind.code = _code
KIND_BY_CODE: tuple[OpKind, ...] = tuple(OpKind)
"""Kinds by integer code."""
KIND_COUNT = len(KIND_BY_CODE)
COMPUTE_KINDS: tuple[OpKind, ...] = tuple(kind for kind in OpKind if kind.compute)
COPY_KINDS: tuple[OpKind, ...] = tuple(kind for kind in OpKind if not kind.compute)
FIRST_COPY_CODE = len(COMPUTE_KINDS)
"""Op codes from ``FIRST_COPY_CODE * units`` on are copies."""
FORWARD_PASS_KINDS: tuple[OpKind, ...] = tuple(
    kind for kind in OpKind if kind.sends is Flow.DOWNSTREAM
)
"""What a forward-only call runs."""
LETTERS = "".join(kind.value for kind in OpKind)

# Integer codes of today's kinds, for the engines that treat one of them specially (the offload
# pass inserts O and R; renderers draw each kind its own way).
KIND_F, KIND_B, KIND_O, KIND_R = (OpKind.FORWARD.code, OpKind.BACKWARD.code, OpKind.OFFLOAD.code,
                                  OpKind.RELOAD.code)


def _check_table() -> None:
    letters = [kind.value for kind in OpKind]
    if len(set(letters)) != len(letters) or not all(len(x) == 1 and x.isupper() for x in letters):
        raise AssertionError(f"op kind letters must be unique capital letters: {letters}")
    for kind in OpKind:
        if any(x not in letters for x in kind.after):
            raise AssertionError(f"{kind!r}: 'after' names an unknown kind: {kind.after}")
        if kind.compute == (kind.nominal_time == 0.0) or (
            kind.sends is not None and not kind.compute
        ):
            raise AssertionError(
                f"{kind!r}: a compute op takes time, a copy neither takes time nor sends")
    computes = [kind.compute for kind in OpKind]
    if computes != sorted(computes, reverse=True):
        raise AssertionError(
            "list the compute kinds before the copies (compute ops get the low codes)")
    if not any(not kind.after for kind in OpKind) or not any(kind.closes for kind in OpKind):
        raise AssertionError("some kind must open a unit (after=()) and some kind close it")
    placed: set[str] = set()  # 'after' must be acyclic: then each kind runs at most once per unit
    while len(placed) < len(letters):
        ready = {kind.value for kind in OpKind
                 if kind.value not in placed and set(kind.after) <= placed}
        if not ready:
            raise AssertionError(
                f"the 'after' column has a cycle among {sorted(set(letters) - placed)}")
        placed |= ready


_check_table()


def unit_life() -> str:
    """The order of a unit's ops on its rank, in words (from the table, for error messages)."""
    parts = []
    for kind in OpKind:
        if not kind.after:
            parts.append(f"{kind.value} first")
        else:
            parts.append(f"{kind.value} right after {' or '.join(kind.after)}")
    closing = " or ".join(kind.value for kind in OpKind if kind.closes)
    return f"each unit runs {', '.join(parts)}, each at most once, and ends with {closing}"


def kinds_table() -> str:
    """The table as markdown (``docs/schedule-ir.md`` shows it; a test keeps them equal)."""
    header = ("| kind | letter | code | compute / copy | sends (p2p) | after | closes | allocates "
              "| frees | needs resident | weight grads | nominal time |")
    rows = [header, "|" + "---|" * 12]
    yes = lambda flag: "yes" if flag else "-"  # noqa: E731
    for kind in OpKind:
        what = "compute" if kind.compute else f"copy {kind.lane.value.upper()}"
        sends = "-" if kind.sends is None else f"{kind.sends.name.lower()} ({kind.sends.payload}s)"
        after = " or ".join(kind.after) if kind.after else "(first)"
        rows.append(
            f"| {kind.word} | `{kind.value}` | {kind.code} | {what} | {sends} | {after} | "
            f"{yes(kind.closes)} | {yes(kind.allocates)} | {yes(kind.frees)} | "
            f"{yes(kind.needs_resident)} | {yes(kind.weight_grads)} | {kind.nominal_time:g} |")
    return "\n".join(rows)
