"""The executor (``--offload-schedule gis``) against unpatched Megatron, and its memory.

Every case builds one tiny GPT per rank and trains it three iterations (plain SGD step on
``main_grad`` after each) several times from the same weights and data: first through
Megatron's own, unpatched schedule function (the reference), then through the executor with
generalized interleaving for each group size and offload policy. Losses, every gradient and
the weights after the last step must be bitwise identical: Megatron's schedules and GIS run
each chunk's backwards in microbatch order (per-chunk FIFO), so every ``main_grad`` is summed
in the same order whatever the group size, and each microbatch's loss is its own computation.

Memory: the runtime measures resident bytes at every step boundary (weak references to the
storages the units keep); ``executor_cases.measured_units`` checks that those bytes are, at
every sample, exactly the bytes of the units the executed ops hold, and the peak of that count
must equal the simulator's ``peak_units`` for the same schedule IR on every rank, with copies
modelled as the CPU backend makes them (synchronous: k = 0).
"""
from __future__ import annotations

import math
import os
import tempfile
import time

import pytest

from megatron_offload.config import OffloadConfig
from megatron_offload.integration.gis_schedule import costs_for, planned_schedule
from megatron_offload.schedule.simulate import simulate
from megatron_offload.testing.executor_cases import measured_units
from megatron_offload.testing.gpt import TinyGPTCase
from megatron_offload.testing.pool import WorkerDied, WorkerError, WorkerPool, session_pool

RUN_VARIANTS = "megatron_offload.testing.executor_cases:run_variants"
POLICIES = {
    "none": dict(policy="none"),
    "chunks1": dict(policy="chunks", offload_chunks=1),
    "full": dict(policy="full"),
}


@pytest.fixture(scope="module")
def pool3():
    return session_pool(3)


def _pool(world: int, pool3, pool4):
    pool = pool3 if world == 3 else pool4
    return pool if pool.alive() else session_pool(world)


def gis(policy: str, group: int, **extra) -> OffloadConfig:
    return OffloadConfig(schedule="gis", group_size=group, measure_memory=True, min_offload_bytes=0,
                         **POLICIES[policy], **extra)


def matrix_case(pp: int, vpp: int, m: int, **extra) -> TinyGPTCase:
    # Megatron's interleaved schedule needs pp <= g and m % g in {0} or >= pp: one group of m
    # when m = 2p + 1 (the reference only; GIS takes any g).
    group = None if vpp == 1 or m % pp == 0 else m
    return TinyGPTCase(pp=pp, vpp=None if vpp == 1 else vpp, microbatches=m, num_layers=pp * vpp,
                       microbatch_group_size=group, **extra)


def variants_for(pp: int, vpp: int) -> list[tuple[str, dict]]:
    out = [("reference", {"offload": None}),
           ("executor-megatron-order", {"offload": OffloadConfig(schedule="gis", policy="none"),
                                        "order": "megatron"})]
    for group in sorted({1, math.ceil(pp / 2), pp}):
        for policy in POLICIES:
            if vpp == 1 and policy == "chunks1":
                continue  # one chunk: chunks K=1 is full
            out.append((f"gis-g{group}-{policy}", {"offload": gis(policy, group), "group": group,
                                                   "policy": policy}))
    return out


def check_matrix(pool, pp: int, vpp: int, m: int) -> list[str]:
    case = matrix_case(pp, vpp, m)
    named = variants_for(pp, vpp)
    ranks = pool.run(RUN_VARIANTS, case=case, variants=[v for _, v in named], iterations=3, timeout=300)
    problems = []
    world = len(ranks)
    for index, (name, variant) in enumerate(named[1:], start=1):
        for rank in ranks[: pp]:  # data-parallel rank 0 of each stage (dp ranks hold the same)
            result = rank[index]
            problems += [f"{name}: {x}" for x in result["mismatches"][:3]]
            if "group" not in variant:
                continue
            config = variant["offload"]
            schedule = planned_schedule(pp, vpp, m, min(variant["group"], m), config.policy,
                                        config.offload_chunks, "cpu")[0]
            predicted = simulate(schedule, costs_for("cpu")).peak_units[result["pp_rank"]]
            try:
                counts = measured_units(result["stats"])
            except AssertionError as error:
                problems.append(f"{name} pp rank {result['pp_rank']}: {error}")
                continue
            if max(counts) != predicted:
                problems.append(f"{name} pp rank {result['pp_rank']}: measured peak {max(counts)} units, "
                                f"simulator {predicted}")
            ops = [str(op) for op in schedule.ranks[result["pp_rank"]]]
            if result["stats"]["executed_ops"] != ops:
                problems.append(f"{name} pp rank {result['pp_rank']}: executed ops differ from the IR")
    assert world % pp == 0
    return problems


FAST = [(2, 2, 2), (4, 2, 9)]
SWEEP = [(p, v, m) for p in (2, 3, 4) for v in (1, 2, 3) for m in (p, 2 * p + 1) if (p, v, m) not in FAST]


@pytest.mark.parametrize("pp, vpp, m", FAST, ids=[f"p{p}v{v}m{m}" for p, v, m in FAST])
def test_gis_bitwise_and_peaks(pool3, pool4, pp, vpp, m):
    problems = check_matrix(_pool(3 if pp == 3 else 4, pool3, pool4), pp, vpp, m)
    assert not problems, "\n".join(problems[:30])


@pytest.mark.slow
@pytest.mark.parametrize("pp, vpp, m", SWEEP, ids=[f"p{p}v{v}m{m}" for p, v, m in SWEEP])
def test_gis_bitwise_and_peaks_sweep(pool3, pool4, pp, vpp, m):
    problems = check_matrix(_pool(3 if pp == 3 else 4, pool3, pool4), pp, vpp, m)
    assert not problems, "\n".join(problems[:30])
