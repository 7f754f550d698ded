"""The schedule IR: per-rank lists of ops over (model chunk, microbatch) units.

Pure Python, no torch. Every consumer (simulator, renderer, runtime executor and the
Megatron integration's run-time order check) reads this one representation.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass


class OpKind(str, enum.Enum):
    FORWARD = "F"
    BACKWARD = "B"
    OFFLOAD = "O"  # device -> host copy of a unit's activations, after its forward
    RELOAD = "R"  # host -> device copy, before its backward


@dataclass(frozen=True, slots=True, order=True)
class Op:
    """One action of one rank on one unit: (kind, model chunk, microbatch).

    Text form ``<chunk><kind><microbatch>``, e.g. ``0F3`` = forward of chunk 0, microbatch 3;
    ``str(op)`` parses back with :meth:`Op.parse`.
    """

    kind: OpKind
    chunk: int
    microbatch: int

    @property
    def unit(self) -> tuple[int, int]:
        return (self.chunk, self.microbatch)

    def __str__(self) -> str:
        return f"{self.chunk}{self.kind.value}{self.microbatch}"

    _TEXT = re.compile(r"^\s*(\d+)([FBOR])(\d+)\s*$")

    @classmethod
    def parse(cls, text: str) -> "Op":
        match = cls._TEXT.match(text)
        if match is None:
            raise ValueError(f"not an op: {text!r} (expected e.g. '0F3': chunk, F/B/O/R, microbatch)")
        return cls(OpKind(match.group(2)), int(match.group(1)), int(match.group(3)))


def F(chunk: int, microbatch: int) -> Op:
    return Op(OpKind.FORWARD, chunk, microbatch)


def B(chunk: int, microbatch: int) -> Op:
    return Op(OpKind.BACKWARD, chunk, microbatch)
