"""Our orders equal what the installed megatron-core (0.16.1 to 0.19.2) runs, from its own table
and warm-up functions."""
from types import SimpleNamespace

import pytest
from megatron.core.pipeline_parallel import schedules  # megatron-dependent: run on every env

from megatron_offload.schedule.ir import B, F
from megatron_offload.schedule.megatron import (
    check_megatron_args,
    megatron_order,
    megatron_schedule,
)
from megatron_offload.schedule.validate import validate_schedule


def _communicator(pp, rank, vpp):
    group = SimpleNamespace(size=lambda: pp, rank=lambda: rank)
    return SimpleNamespace(pp_group=group, virtual_pipeline_model_parallel_size=vpp)


def _megatron_accepts(pp, vpp, m, g):
    # forward_backward_pipelining_with_interleaving's two checks (schedules.py, 0.16.1)
    if g > m or g < pp:
        return False
    return not 0 < m % g < pp


def _expected(pp, rank, vpp, m, g, interleaved):
    total, _, warmup, remaining = schedules.get_pp_rank_microbatches(
        m, vpp, g, p2p_communicator=_communicator(pp, rank, vpp if interleaved else None)
    )
    table = schedules.get_schedule_table(m, vpp, g)
    fwd = [F(chunk, mb) for mb, chunk in table]
    bwd = [B(vpp - 1 - chunk, mb) for mb, chunk in table]
    order = fwd[:warmup]
    for k in range(remaining):
        order += [fwd[k + warmup], bwd[k]]
    return order + bwd[remaining:total]


def _cases():
    for pp in range(2, 9):
        for vpp in range(1, 5):
            for m in sorted({pp, 2 * pp, 3 * pp + 1}):
                if vpp == 1:
                    yield pp, vpp, m, pp
                    continue
                for g in range(pp, m + 1):
                    if _megatron_accepts(pp, vpp, m, g):
                        yield pp, vpp, m, g


def test_exact_orders_for_every_accepted_combination():
    count = 0
    for pp, vpp, m, g in _cases():
        kind = "1f1b" if vpp == 1 else "interleaved"
        schedule = megatron_schedule(kind, pp, vpp, m, g)
        for rank in range(pp):
            expected = _expected(pp, rank, vpp, m, g if vpp > 1 else pp, interleaved=vpp > 1)
            assert list(schedule.ranks[rank]) == expected, (pp, vpp, m, g, rank)
        validate_schedule(schedule)
        count += 1
    assert count == 183  # every (p, v, m, g) Megatron accepts in the grid


@pytest.mark.parametrize("pp,m,g", [(4, 8, 4), (3, 9, 3), (2, 6, 3)])
def test_interleaved_with_one_chunk_matches_megatron(pp, m, g):
    # vp_size=1 still takes Megatron's interleaved path (warm-up 2 (p - r - 1)).
    if not _megatron_accepts(pp, 1, m, g):
        pytest.skip("Megatron refuses")
    for rank in range(pp):
        assert (megatron_order("interleaved", pp, rank, 1, m, g)
                == _expected(pp, rank, 1, m, g, True))


def test_acceptance_matches_megatron_checks():
    for pp in range(2, 7):
        for m in range(1, 3 * pp + 2):
            for g in range(1, m + 2):
                accepted = True
                try:
                    check_megatron_args("interleaved", pp, 2, m, g)
                except ValueError:
                    accepted = False
                assert accepted == _megatron_accepts(pp, 2, m, g), (pp, m, g)


def test_default_group_size_is_pp():
    assert megatron_schedule("interleaved", 4, 2, 8).group_size == 4


@pytest.mark.parametrize(
    "args,flag",
    [
        (("1f1b", 4, 2, 8, None), "--vpp"),
        (("interleaved", 4, 2, 8, 3), "--group-size"),
        (("interleaved", 4, 2, 10, 4), "--microbatches"),
        (("interleaved", 4, 2, 3, None), "--microbatches"),
        (("interleaved", 1, 2, 3, None), "--pp"),
        (("interleaved", 0, 2, 3, None), "--pp"),
    ],
)
def test_refusals_name_the_flag(args, flag):
    with pytest.raises(ValueError, match=flag):
        check_megatron_args(*args)
