"""Layer streaming in the schedule IR (issue 10): expansion, text form, byte simulation, link."""
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_offload.schedule.catalog import make_schedule
from megatron_offload.schedule.ir import Op, ScheduleError
from megatron_offload.schedule.kinds import OpKind
from megatron_offload.schedule.layer_sim import simulate_layer_schedule, simulate_layers
from megatron_offload.schedule.layers import (
    EPILOGUE,
    LayerProfile,
    LayerSchedule,
    LinkModel,
    check_rank,
    copies_per_iteration,
    diff_rank_ops,
    expand_rank,
    expand_schedule,
    forward_ends,
    memory_effect,
    reload_distances_for_link,
    stream_sets,
    unit_lifespans,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _text(ops):
    return ",".join(map(str, ops))


def _expand(ops, layers, **kwargs):
    return _text(expand_rank(ops, layers, **kwargs))


def _1f1b_p2_m2():
    return make_schedule("1f1b", 2, 1, 2)


# ---- the IR's text form ---------------------------------------------------------------------


@pytest.mark.parametrize("text", ["0F3", "0F3.2", "0O3.2", "0R3.2", "0O3", "0R3", "0B3", "0B3.2",
                                  "12B7.31"])
def test_text_round_trip(text):
    op = Op.parse(text)
    assert str(op) == text and Op.parse(str(op)) == op
    assert (op.unit == (op.chunk, op.microbatch)
            and op.sub_unit == (op.chunk, op.microbatch, op.layer))


def test_parse_fields_and_errors():
    assert Op.parse("1B4.0") == Op(OpKind.BACKWARD, 1, 4, 0)
    assert Op.parse("1B4").layer is None
    for bad in ("F3", "0X3", "0F3.", "0F3.a", "0F3.1.2"):
        with pytest.raises(ValueError, match="not a layer op"):
            Op.parse(bad)


def test_layer_schedule_text_round_trip():
    schedule = make_schedule("interleaved", 2, 2, 4)
    sets = [stream_sets(ops) for ops in schedule.ranks]
    expanded = expand_schedule(schedule, [2, 3], [s for s, _ in sets], [o for _, o in sets],
                               reload_distance=1)
    assert LayerSchedule.from_text(expanded.to_text()) == expanded
    assert expanded.layers == (2, 3)


# ---- exact expansions, written out by hand --------------------------------------------------


def test_1f1b_p2_m2_l2_full_streaming():
    schedule = _1f1b_p2_m2()
    rank0, rank1 = schedule.ranks
    assert _text(rank0) == "0F0,0F1,0B0,0B1" and _text(rank1) == "0F0,0B0,0F1,0B1"
    streamed0, offloaded0 = stream_sets(rank0)
    assert streamed0 == offloaded0 == {(0, 0), (0, 1)}
    # Rank 0: both units have a lifespan: every layer and the rest leave and come back.
    assert _expand(rank0, 2, streamed=streamed0, offloaded=offloaded0) == (
        "0F0,0F0.0,0O0.0,0F0.1,0O0.1,0O0,"
        "0F1,0F1.0,0O1.0,0F1.1,0O1.1,0O1,"
        "0R0,0B0,0R0.1,0B0.1,0R0.0,0B0.0,"
        "0R1,0B1,0R1.1,0B1.1,0R1.0,0B1.0"
    )
    # Rank 1 (last): zero lifespans: layer 0 streams, the last layer and the rest stay.
    streamed1, offloaded1 = stream_sets(rank1)
    assert streamed1 == {(0, 0), (0, 1)} and offloaded1 == set()
    assert _expand(rank1, 2, streamed=streamed1, offloaded=offloaded1) == (
        "0F0,0F0.0,0O0.0,0F0.1,0B0,0B0.1,0R0.0,0B0.0,"
        "0F1,0F1.0,0O1.0,0F1.1,0B1,0B1.1,0R1.0,0B1.0"
    )
    expanded = expand_schedule(schedule, 2, [streamed0, streamed1], [offloaded0, offloaded1])
    assert copies_per_iteration(expanded) == [6, 2]


def test_last_rank_zero_lifespan_units_l3():
    rank = _1f1b_p2_m2().ranks[1]
    streamed, offloaded = stream_sets(rank)
    assert _expand(rank, 3, streamed=streamed, offloaded=offloaded) == (
        "0F0,0F0.0,0O0.0,0F0.1,0O0.1,0F0.2,0B0,0B0.2,0R0.1,0B0.1,0R0.0,0B0.0,"
        "0F1,0F1.0,0O1.0,0F1.1,0O1.1,0F1.2,0B1,0B1.2,0R1.1,0B1.1,0R1.0,0B1.0"
    )


def test_offloaded_zero_lifespan_unit_keeps_its_rest():
    # Forced to leave entirely, a unit whose backward follows its forward: the rest's copy would
    # come straight back (nothing in between): dropped; the last layer has B(c,m) in between.
    assert _expand(_1f1b_p2_m2().ranks[1][:2], 2, offloaded={(0, 0)}) == (
        "0F0,0F0.0,0O0.0,0F0.1,0O0.1,0B0,0R0.1,0B0.1,0R0.0,0B0.0")


def test_not_streamed_units_are_not_copied():
    rank = _1f1b_p2_m2().ranks[0]
    assert _expand(rank, 2) == "0F0,0F0.0,0F0.1,0F1,0F1.0,0F1.1,0B0,0B0.1,0B0.0,0B1,0B1.1,0B1.0"
    # Only unit (0, 1) streams; it has a lifespan but is not offloaded: layer 0 only.
    assert _expand(rank, 2, streamed={(0, 1)}) == (
        "0F0,0F0.0,0F0.1,0F1,0F1.0,0O1.0,0F1.1,0B0,0B0.1,0B0.0,0B1,0B1.1,0R1.0,0B1.0")


def test_reload_distance_one():
    rank = _1f1b_p2_m2().ranks[0]
    units = {(0, 0), (0, 1)}
    # compute positions: F0 0, F0.0 1, F0.1 2, F1 3, F1.0 4, F1.1 5, B0 6, B0.1 7, B0.0 8, B1 9,
    # B1.1 10, B1.0 11
    assert _expand(rank, 2, streamed=units, offloaded=units, reload_distance=1) == (
        "0F0,0F0.0,0O0.0,0F0.1,0O0.1,0O0,"
        "0F1,0F1.0,0O1.0,0R0,0F1.1,0O1.1,0O1,"
        "0R0.1,0B0,0R0.0,0B0.1,0R1,0B0.0,0R1.1,0B1,0R1.0,0B1.1,0B1.0"
    )


def test_several_reloads_at_one_point_in_order_of_first_use():
    rank = _1f1b_p2_m2().ranks[0]
    units = {(0, 0), (0, 1)}
    distance = {(0, 0, None): 0, (0, 0, 1): 1, (0, 0, 0): 2}  # all three before B0 (position 6)
    text = _expand(rank, 2, streamed=units, offloaded=units,
                   reload_distance=lambda sub: distance.get(sub, 0))
    assert "0O1,0R0,0R0.1,0R0.0,0B0,0B0.1,0B0.0" in text
    # the same with a mapping (default 0)
    assert _expand(rank, 2, streamed=units, offloaded=units, reload_distance=distance) == text


def test_distance_too_large_drops_the_copy():
    rank = _1f1b_p2_m2().ranks[0]
    units = {(0, 0), (0, 1)}
    # Unit (0, 0)'s rest: O after compute position 3 (F0, F0.0, F0.1 emitted), use at 6:
    # distance 2 puts R before position 4 (F1.0): one compute entry (F1) in between: kept;
    # distance 3 puts it before position 3 (F1): nothing in between: dropped.
    kept = expand_rank(rank, 2, streamed=units, offloaded=units,
                       reload_distance=lambda s: 2 if s == (0, 0, None) else 0)
    dropped = expand_rank(rank, 2, streamed=units, offloaded=units,
                          reload_distance=lambda s: 3 if s == (0, 0, None) else 0)
    assert "0O0,0F1,0R0,0F1.0" in _text(kept)
    names = _text(dropped).split(",")
    assert "0O0" not in names and "0R0" not in names and "0O0.1,0F1," in _text(dropped)


def test_bad_input():
    rank = _1f1b_p2_m2().ranks[0]
    with pytest.raises(ValueError, match="layers-per-chunk"):
        expand_rank(rank, -1)
    with pytest.raises(ValueError, match="reload distance"):
        expand_rank(rank, 2, streamed={(0, 0)}, reload_distance=-1)
    with pytest.raises(ScheduleError):
        expand_rank(rank[1:], 2)


def test_check_rank_catches_a_reload_after_its_use():
    rank = _1f1b_p2_m2().ranks[0]
    units = {(0, 0), (0, 1)}
    ops = expand_rank(rank, 2, streamed=units, offloaded=units)
    check_rank(ops)
    late = list(ops)
    i = late.index(Op.parse("0R0.1"))
    late[i], late[i + 1] = late[i + 1], late[i]  # 0B0.1 before its reload
    with pytest.raises(ScheduleError, match="before its reload"):
        check_rank(late)
    with pytest.raises(ScheduleError, match="no compute entry"):
        check_rank([Op.parse(x) for x in "0F0,0F0.0,0O0.0,0R0.0,0B0,0B0.0".split(",")])


# ---- properties over random schedules -------------------------------------------------------


@st.composite
def layer_cases(draw):
    kind = draw(st.sampled_from(["1f1b", "interleaved", "gis"]))
    pp = draw(st.integers(1, 4))
    vpp = 1 if kind == "1f1b" else draw(st.integers(1, 3))
    if kind == "interleaved" and (vpp == 1 or pp == 1):
        kind = "gis"
    if kind == "interleaved":
        m = pp * draw(st.integers(1, 3))
        g = None
    else:
        m = draw(st.integers(1, 6))
        g = draw(st.integers(1, m)) if kind == "gis" else None
    schedule = make_schedule(kind, pp, vpp, m, g)
    layers = [draw(st.integers(1, 4)) for _ in range(vpp)]
    seed = draw(st.integers(0, 2**16))
    distance = draw(st.one_of(st.integers(0, 6), st.just("random")))
    return schedule, layers, seed, distance


def _random_sets(schedule, seed):
    rng = random.Random(seed)
    streamed, offloaded = [], []
    for ops in schedule.ranks:
        units = sorted({op.unit for op in ops})
        s = {u for u in units if rng.random() < 0.7}
        o = {u for u in units if rng.random() < 0.5}
        streamed.append(s)
        offloaded.append(o)
    return streamed, offloaded


@SETTINGS
@given(layer_cases())
def test_expansion_properties(case):
    schedule, layers, seed, distance = case
    streamed, offloaded = _random_sets(schedule, seed)
    if distance == "random":
        rng = random.Random(seed + 1)
        table = {}
        reload_distance = lambda sub: table.setdefault(sub, rng.randint(0, 5))  # noqa: E731
    else:
        reload_distance = distance
    expanded = expand_schedule(schedule, layers, streamed, offloaded, reload_distance)
    for rank, ops in enumerate(expanded.ranks):
        check_rank(ops)  # every O: a compute entry before its R; every R before its first use
        # the compute entries are exactly the unit order, refined
        units = [op for op in ops if op.is_compute and op.layer is None]
        assert [(op.kind, op.unit) for op in units] == [
            (op.kind, op.unit) for op in schedule.ranks[rank]
        ]
        computes = sum(1 for op in ops if op.is_compute)
        assert computes == sum(1 + layers[op.chunk] for op in schedule.ranks[rank])
        # copies: at most what the units offer, exactly that at distance 0
        offer = sum(layers[c] - 1 for (c, m) in streamed[rank] | offloaded[rank]
                    if (c, m) not in offloaded[rank])
        lifespans = unit_lifespans(schedule.ranks[rank])
        offer0 = offer + sum(layers[c] + (1 if lifespans[(c, m)] > 0 else 0)
                             for (c, m) in offloaded[rank])
        copies = copies_per_iteration(expanded)[rank]
        assert copies == sum(1 for op in ops if op.kind is OpKind.RELOAD)
        if distance == 0:
            assert copies == offer0
        else:
            assert copies <= offer0
        # only streamed/offloaded units move; the rest only when offloaded
        for op in ops:
            if op.kind is OpKind.OFFLOAD:
                assert op.unit in streamed[rank] | offloaded[rank]
                if op.layer is None or op.layer == layers[op.chunk] - 1:
                    assert op.unit in offloaded[rank]
        # synchronous bytes: the level ends where it started and never goes negative
        profile = LayerProfile.uniform(schedule.vpp, layers, 10.0, 3.0)
        sim = simulate_layers(ops, profile)
        assert sim.level_after[-1] == pytest.approx(0.0) and min(sim.level_after) >= -1e-9
        plain = simulate_layers(expand_rank(schedule.ranks[rank], layers), profile)
        assert sim.peak_bytes <= plain.peak_bytes + 1e-9
        # the event engine against a plain walk of the memory rule, with random transients
        rng = random.Random(seed + rank)
        rough = LayerProfile(
            rest_bytes=[rng.randint(0, 9) for _ in layers],
            layer_bytes=[[rng.randint(0, 9) for _ in range(n)] for n in layers],
            forward_peak=[[rng.randint(0, 19) for _ in range(n)] for n in layers],
            backward_peak=[[rng.randint(0, 19) for _ in range(n)] for n in layers],
            prologue_peak=[rng.randint(0, 9) for _ in layers],
            epilogue_peak=[rng.randint(0, 9) for _ in layers],
            backward_rest_peak=[rng.randint(0, 9) for _ in layers], base_bytes=rng.randint(0, 5),
            forward_time=[[rng.choice([0.0, 1.0]) for _ in range(n)] for n in layers],
        )
        walked = _walk(ops, rough)
        engine = simulate_layers(ops, rough)
        assert engine.peak_bytes == walked[0] and engine.level_after == walked[1]


def _walk(ops, profile):
    """The synchronous memory rule as a plain walk: (peak, level after each entry)."""
    level = peak = profile.base_bytes
    after = []
    ends = forward_ends(ops)
    for index, op in enumerate(ops):
        transient, change = memory_effect(op.kind, op.chunk, op.layer, profile)
        peak = max(peak, level + transient)
        level += change
        peak = max(peak, level)
        if index in ends:
            transient, change = memory_effect(EPILOGUE, op.chunk, None, profile)
            peak = max(peak, level + transient)
            level += change
            peak = max(peak, level)
        after.append(level)
    return peak, after


def test_diff_rank_ops():
    rank = _1f1b_p2_m2().ranks[1]
    ops = expand_rank(rank, 2, streamed={(0, 0)})
    assert diff_rank_ops(ops, [str(op) for op in ops]) == ""
    issued = [str(op) for op in ops if str(op) != "0R0.0"]
    message = diff_rank_ops(ops, issued)
    assert "first difference at entry 6" in message and "0R0.0" in message


# ---- bytes on hand-computed profiles ----------------------------------------------------------


def _hand_profile():
    return LayerProfile(
        rest_bytes=(5,), layer_bytes=((10, 20),), forward_peak=((13, 23),), backward_peak=((7, 7),),
        prologue_peak=(2,), epilogue_peak=(4,), backward_rest_peak=(6,),
    )


def test_bytes_hand_computed_last_rank():
    rank = _1f1b_p2_m2().ranks[1]
    streamed, offloaded = stream_sets(rank)
    ops = expand_rank(rank, 2, streamed=streamed, offloaded=offloaded)
    sim = simulate_layers(ops, _hand_profile())
    # F0 2 | F0.0 13 -> 10 | O0.0 -> 0 | F0.1 23 -> 20 | epilogue 24 -> 25 | B0 31 | B0.1 32 -> 5 |
    # R0.0 -> 15 | B0.0 22 -> 0
    assert sim.peak_bytes == 32 and str(sim.ops[sim.peak_entry]) == "0B0.1"
    # (peak_in of 0F0.1 includes its unit's epilogue, 20 + 4; level_after the rest's 5 bytes)
    assert [sim.level_after[i] for i in range(8)] == [0, 10, 0, 25, 25, 5, 15, 0]
    assert [sim.peak_in[i] for i in range(8)] == [2, 13, 0, 24, 31, 32, 15, 22]
    assert sim.copies == 2 and sim.offloaded_bytes == sim.reloaded_bytes == 20
    # without streaming: F0.1 at 10 + 23, epilogue 30 + 4, B0 35 + 6, B0.1 35 + 7
    assert simulate_layers(expand_rank(rank, 2), _hand_profile()).peak_bytes == 42


def test_bytes_hand_computed_everything_out():
    rank = _1f1b_p2_m2().ranks[0]
    streamed, offloaded = stream_sets(rank)
    sim = simulate_layers(expand_rank(rank, 2, streamed=streamed, offloaded=offloaded),
                          _hand_profile())
    # forward: at most 23 (F.1 with layer 0 gone); backward: R0 5, B0 11, R0.1 25, B0.1 32 -> 5,
    # R0.0 15, B0.0 22
    assert sim.peak_bytes == 32
    assert sim.copies == 6 and sim.offloaded_bytes == 2 * 35
    # base bytes add to every level
    base = LayerProfile(rest_bytes=(5,), layer_bytes=((10, 20),), base_bytes=100)
    assert simulate_layers(expand_rank(rank, 2), base).peak_bytes == 100 + 2 * 35


def test_units_equivalent_matches_unit_peaks_without_streaming():
    # one layer per chunk, no transients: the byte peak is the unit simulator's peak in units
    from megatron_offload.schedule.simulate import simulate

    schedule = make_schedule("interleaved", 4, 2, 8)
    expanded = expand_schedule(schedule, 3, [set()] * 4, [set()] * 4)
    profile = LayerProfile.uniform(2, 3, 1.0, 1.0)
    sim = simulate_layer_schedule(expanded, profile)
    assert (
        [p / profile.unit_bytes(0) for p in sim.peak_bytes]
        == simulate(schedule).peak_units
        == [11, 9, 7, 5]
    )


# ---- the link ----------------------------------------------------------------------------------


def _link_case(bandwidth, *, distance=None):
    schedule = make_schedule("interleaved", 4, 2, 8)
    rank = schedule.ranks[0]
    streamed, offloaded = stream_sets(rank)
    profile = LayerProfile.uniform(2, 4, 10.0, 5.0, forward_time=1.0, backward_time=2.0)
    link = LinkModel(d2h_bytes_per_time=bandwidth)
    candidates = expand_rank(rank, 4, streamed=streamed, offloaded=offloaded)
    distances = (
        reload_distances_for_link(candidates, profile, link) if distance is None else distance
    )
    ops = expand_rank(rank, 4, streamed=streamed, offloaded=offloaded, reload_distance=distances)
    return simulate_layers(ops, profile, link), distances


def test_link_distances_grow_as_the_link_slows():
    fast_sim, fast = _link_case(20.0)
    slow_sim, slow = _link_case(6.0)
    assert set(fast) == set(slow)
    assert all(slow[s] >= fast[s] for s in fast) and sum(slow.values()) > sum(fast.values())
    assert fast_sim.stall == 0 and slow_sim.stall == 0  # the link keeps up, just later/earlier
    # reloads issued just before their use stall on a slow link
    late_sim, _ = _link_case(6.0, distance=0)
    assert late_sim.stall > 0 and late_sim.finish > slow_sim.finish
    # "as late as allowed": one entry later would make some reload late
    later = {s: max(0, d - 1) for s, d in slow.items()}
    later_sim, _ = _link_case(6.0, distance=later)
    assert later_sim.stall > 0
    # a link too slow to keep up: stalls even with the planned distances, and a higher peak
    crawl_sim, crawl = _link_case(4.0)
    assert crawl_sim.stall > 0 and max(crawl.values()) > max(slow.values())


def test_synchronous_link_is_distance_zero_and_frees_at_once():
    rank = _1f1b_p2_m2().ranks[0]
    streamed, offloaded = stream_sets(rank)
    ops = expand_rank(rank, 2, streamed=streamed, offloaded=offloaded)
    assert set(reload_distances_for_link(ops, _hand_profile(), None).values()) == {0}
    # a fast link frees a layer later than the synchronous model: a higher or equal peak
    sync = simulate_layers(ops, _hand_profile())
    linked = simulate_layers(ops, _hand_profile(), LinkModel(d2h_bytes_per_time=1.0))
    assert linked.peak_bytes >= sync.peak_bytes and linked.stall > 0


def test_d2h_and_h2d_lanes_are_fifo_and_shared_lanes_slow_down():
    schedule = make_schedule("1f1b", 2, 1, 4)
    sets = [stream_sets(ops) for ops in schedule.ranks]
    expanded = expand_schedule(schedule, 3, [s for s, _ in sets], [o for _, o in sets], 1)
    profile = LayerProfile.uniform(1, 3, 10.0, 5.0)
    own = simulate_layer_schedule(expanded, profile, LinkModel(d2h_bytes_per_time=8.0))
    shared = simulate_layer_schedule(expanded, profile,
                                     LinkModel(d2h_bytes_per_time=8.0, shared=True))
    for sim in own.ranks:
        for kind in (OpKind.OFFLOAD, OpKind.RELOAD):
            spans = sorted((sim.start[i], sim.end[i]) for i, op in enumerate(sim.ops)
                           if op.kind is kind)
            assert all(a[1] <= b[0] + 1e-9 for a, b in zip(spans, spans[1:]))  # never two at once
    assert shared.makespan >= own.makespan and sum(shared.stall) >= sum(own.stall)
    for kind in (OpKind.OFFLOAD, OpKind.RELOAD):
        # ranks 0 and 1 share one lane per direction: never two copies at once
        spans = sorted((sim.start[i], sim.end[i]) for sim in shared.ranks
                       for i, op in enumerate(sim.ops) if op.kind is kind)
        assert all(a[1] <= b[0] + 1e-9 for a, b in zip(spans, spans[1:]))
        # and each rank's copies run in the order it issued them (one stream)
        for sim in shared.ranks:
            starts = [sim.start[i] for i, op in enumerate(sim.ops) if op.kind is kind]
            assert starts == sorted(starts)


def test_pipeline_waits_make_the_makespan_of_the_unit_simulator():
    from megatron_offload.schedule.costs import CostModel
    from megatron_offload.schedule.simulate import simulate

    schedule = make_schedule("interleaved", 4, 2, 8)
    expanded = expand_schedule(schedule, 2, [set()] * 4, [set()] * 4)
    profile = LayerProfile.uniform(2, 2, 1.0, forward_time=0.5, backward_time=1.0)
    assert (
        simulate_layer_schedule(expanded, profile).makespan
        == simulate(schedule, CostModel(forward_time=1.0, backward_time=2.0)).makespan
    )


def test_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom megatron_offload.schedule import layers, layer_sim\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_drop_unhidden_with_pipeline_timing_never_stalls():
    schedule = make_schedule("interleaved", 4, 2, 8)
    sets = [stream_sets(ops) for ops in schedule.ranks]
    streamed, offloaded = [s for s, _ in sets], [o for _, o in sets]
    profile = LayerProfile.uniform(2, 4, 10.0, 5.0)
    link = LinkModel(d2h_bytes_per_time=6.0)
    candidates = expand_schedule(schedule, 4, streamed, offloaded)
    timing = simulate_layer_schedule(candidates, profile)  # synchronous: the compute times only
    results = {}
    for drop in (False, True):
        distances = [
            reload_distances_for_link(
                ops, profile, link, timing=timing.ranks[r], drop_unhidden=drop
            )
            for r, ops in enumerate(candidates.ranks)
        ]
        results[drop] = simulate_layer_schedule(
            expand_schedule(schedule, 4, streamed, offloaded, distances), profile, link
        )
    assert sum(results[False].stall) > 0 and results[False].makespan > timing.makespan
    assert results[True].stall == [0.0] * 4 and results[True].makespan == timing.makespan
    assert sum(results[True].copies) < sum(results[False].copies)
    with pytest.raises(ValueError, match="not the same rank"):
        reload_distances_for_link(expand_rank(schedule.ranks[0], 3),
                                  LayerProfile.uniform(2, 3, 1.0), link, timing=timing.ranks[0])


# ---- the CLI -----------------------------------------------------------------------------------


def _cli_json(capsys, *argv):
    import json

    from megatron_offload.cli import main

    assert main(["simulate", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_layer_granularity(capsys, tmp_path):
    base = ["--pp", "4", "--vpp", "2", "--microbatches", "8", "--schedule", "interleaved",
            "--granularity", "layer", "--layers-per-chunk", "4", "--json"]
    plain = _cli_json(capsys, *base)
    unit_keys = {"schedule", "pp", "vpp", "microbatches", "group_size", "makespan", "bubble_ratio",
                 "peak_units", "offloaded_units_fraction", "slowdown_vs_no_offload"}
    assert unit_keys <= set(plain) and {"granularity", "peak_bytes", "peak_units_equivalent",
                                        "copies", "stall"} <= set(plain)
    assert (
        plain["peak_units_equivalent"] == [11, 9, 7, 5]
        and plain["copies"] == [0] * 4
        and plain["makespan"] == 57
    )
    assert plain["peak_bytes"] == [11 * 4 * 2**20, 9 * 4 * 2**20, 7 * 4 * 2**20, 5 * 4 * 2**20]
    streamed = _cli_json(capsys, *base, "--offload-ratio", "0.8", "--save-schedule",
                         str(tmp_path / "s.txt"), "--out", str(tmp_path / "t.svg"))
    assert all(a < b for a, b in zip(streamed["peak_bytes"], plain["peak_bytes"]))
    assert streamed["stall"] == [0.0] * 4 and streamed["slowdown_vs_no_offload"] == 0
    assert min(streamed["copies"]) > 0 and (tmp_path / "t.svg").stat().st_size > 1000
    saved = LayerSchedule.from_text((tmp_path / "s.txt").read_text())
    assert copies_per_iteration(saved) == streamed["copies"]
    # synchronous copies (k = 0) with a fixed distance
    sync = _cli_json(capsys, *base, "--offload-chunks", "1", "--offload-ratio", "0",
                     "--reload-distance", "1")
    assert sync["synchronous_copies"] and all(
        a < b for a, b in zip(sync["peak_bytes"], plain["peak_bytes"])
    )


def test_cli_layer_text_output(capsys):
    from megatron_offload.cli import main

    assert main(["simulate", "--pp", "2", "--microbatches", "4", "--schedule", "1f1b",
                 "--granularity", "layer", "--layers-per-chunk", "2", "--offload-ratio", "0.5",
                 "--width", "40"]) == 0
    out = capsys.readouterr().out
    assert "units-equiv" in out and "d2h" in out and "rank 1" in out


@pytest.mark.parametrize("argv,flag", [
    (["--granularity", "layer"], "--layers-per-chunk"),
    (["--granularity", "layer", "--layers-per-chunk", "0"], "--layers-per-chunk"),
    (["--layers-per-chunk", "2"], "--granularity"),
    (["--granularity", "layer", "--layers-per-chunk", "2", "--layer-bytes", "-1"], "--layer-bytes"),
    (["--granularity", "layer", "--layers-per-chunk", "2", "--reload-distance", "soon"],
     "--reload-distance"),
])
def test_cli_layer_bad_input(argv, flag, capsys):
    from megatron_offload.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["simulate", "--pp", "2", "--microbatches", "4", "--schedule", "1f1b", *argv])
    assert exit_.value.code == 2
    assert flag in capsys.readouterr().err.split("error:")[1]


def test_uneven_stages_per_rank_layers():
    schedule = _1f1b_p2_m2()
    sets = [stream_sets(ops) for ops in schedule.ranks]
    expanded = expand_schedule(schedule, [[3], [1]], [s for s, _ in sets], [o for _, o in sets])
    assert expanded.layers == ((3,), (1,)) and expanded.layers_of_rank(1) == (1,)
    assert (
        LayerSchedule.from_text(expanded.to_text()) == expanded
        and "layers=3;1" in expanded.to_text()
    )
    # rank 1 has one layer: its zero-lifespan units copy nothing
    assert copies_per_iteration(expanded) == [8, 0]
    profiles = [LayerProfile.uniform(1, 3, 1.0), LayerProfile.uniform(1, 1, 1.0)]
    sim = simulate_layer_schedule(expanded, profiles)
    assert sim.peak_bytes == [1.0, 1.0]
    with pytest.raises(ValueError, match="layers per chunk"):
        simulate_layer_schedule(expanded, profiles[::-1])
    assert expand_schedule(schedule, [[2], [2]], [set()] * 2, [set()] * 2).layers == (2,)


@SETTINGS
@given(layer_cases(), st.sampled_from([0.5, 1.0, 3.0, 8.0, 64.0]))
def test_link_distances_never_stall_a_rank_run_alone_when_unhidden_copies_are_dropped(
    case, bandwidth
):
    schedule, layers, seed, _ = case
    rng = random.Random(seed)
    link = LinkModel(d2h_bytes_per_time=bandwidth,
                     h2d_bytes_per_time=bandwidth * rng.choice([0.5, 1.0, 2.0]))
    profile = LayerProfile(
        rest_bytes=[rng.randint(0, 4) for _ in layers],
        layer_bytes=[[rng.randint(1, 8) for _ in range(n)] for n in layers],
        forward_time=[[rng.choice([0.5, 1.0]) for _ in range(n)] for n in layers],
        backward_time=[[rng.choice([1.0, 2.0]) for _ in range(n)] for n in layers],
        epilogue_time=[rng.choice([0.0, 0.5]) for _ in layers],
        backward_rest_time=[rng.choice([0.0, 0.5]) for _ in layers],
    )
    for ops in schedule.ranks:
        streamed, offloaded = stream_sets(ops)
        candidates = expand_rank(ops, layers, streamed=streamed, offloaded=offloaded)
        distances = reload_distances_for_link(candidates, profile, link, drop_unhidden=True)
        placed = expand_rank(ops, layers, streamed=streamed, offloaded=offloaded,
                             reload_distance=distances)
        sim = simulate_layers(placed, profile, link)
        assert sim.stall <= 1e-9 * max(sim.finish, 1.0)
        # the compute timeline is that of the run without copies
        plain = simulate_layers(expand_rank(ops, layers), profile)
        assert sim.finish == pytest.approx(plain.finish)


def test_plan_layer_streaming():
    from megatron_offload.schedule.layer_sim import plan_layer_streaming

    schedule = make_schedule("gis", 4, 2, 8, 4)
    profile = LayerProfile.uniform(2, 3, 8.0, 2.0)
    plan = plan_layer_streaming(schedule, 3, profile, LinkModel(d2h_bytes_per_time=16.0))
    assert plan.baseline.copies == [0] * 4 and min(plan.simulation.copies) > 0
    assert plan.simulation.stall == [0.0] * 4 and plan.slowdown == 0
    assert all(a < b for a, b in zip(plan.simulation.peak_bytes, plan.baseline.peak_bytes))
    # the same orders from the parts
    again = expand_schedule(schedule, 3, plan.streamed, plan.offloaded, plan.distances)
    assert again == plan.expanded
    # chunks=0: nothing moves; chunk 0 only: only chunk-0 units move
    assert plan_layer_streaming(schedule, 3, profile, chunks=0).simulation.copies == [0] * 4
    only0 = plan_layer_streaming(schedule, 3, profile, chunks=1, reload_distance=1)
    assert {op.chunk for ops in only0.expanded.ranks for op in ops
            if op.kind is OpKind.OFFLOAD} == {0}
    with pytest.raises(ValueError, match="auto"):
        plan_layer_streaming(schedule, 3, profile, reload_distance="late")


def test_pictures(tmp_path):
    from megatron_offload.schedule.layer_sim import plan_layer_streaming
    from megatron_offload.schedule.render_layers import render_layer_figure, render_layers_ascii

    plan = plan_layer_streaming(make_schedule("1f1b", 2, 1, 3), 2,
                                LayerProfile.uniform(1, 2, 4.0, 1.0),
                                LinkModel(d2h_bytes_per_time=4.0))
    text = render_layers_ascii(plan.simulation, width=60)
    assert text.count("rank ") == 2 and ">" in text and "<" in text and "a" in text and "A" in text
    assert render_layers_ascii(plan.simulation.ranks[1], width=30).startswith("rank 1")
    render_layer_figure(plan.simulation, str(tmp_path / "all.png"))
    render_layer_figure(plan.simulation, str(tmp_path / "one.svg"), ranks=[1], title="rank 1")
    assert ((tmp_path / "all.png").read_bytes()[:4] == b"\x89PNG"
            and b"<svg" in (tmp_path / "one.svg").read_bytes()[:500])
    with pytest.raises(ValueError, match="not in this simulation"):
        render_layer_figure(plan.simulation, str(tmp_path / "x.png"), ranks=[5])


def test_profile_must_cover_the_entries():
    ops = expand_rank(_1f1b_p2_m2().ranks[0], 3)
    with pytest.raises(ValueError, match="outside the profile"):
        simulate_layers(ops, LayerProfile.uniform(1, 2, 1.0))
    with pytest.raises(ValueError, match="shape of layer_bytes"):
        LayerProfile(rest_bytes=(0,), layer_bytes=((1, 1),), forward_peak=((1,),))
    with pytest.raises(ValueError, match="one per model chunk"):
        LayerProfile(rest_bytes=(0, 0), layer_bytes=((1, 1),))


@SETTINGS
@given(layer_cases(), st.sampled_from([None, 2.0, 16.0]), st.booleans(),
       st.sampled_from([0.0, 0.25]))
def test_whole_schedule_runs_with_any_link(case, bandwidth, shared, latency):
    schedule, layers, seed, distance = case
    streamed, offloaded = _random_sets(schedule, seed)
    expanded = expand_schedule(schedule, layers, streamed, offloaded,
                               0 if distance == "random" else distance)
    profile = LayerProfile.uniform(schedule.vpp, layers, 4.0, 1.0,
                                   epilogue_time=(0.5,) * schedule.vpp)
    link = None if bandwidth is None else LinkModel(d2h_bytes_per_time=bandwidth, shared=shared)
    sim = simulate_layer_schedule(expanded, profile, link, p2p_latency=latency)
    base = simulate_layer_schedule(
        expand_schedule(schedule, layers, [set()] * schedule.pp, [set()] * schedule.pp),
        profile,
        p2p_latency=latency,
    )
    assert sim.makespan >= base.makespan - 1e-9
    for rank, (run, plain) in enumerate(zip(sim.ranks, base.ranks)):
        assert run.level_after[-1] == pytest.approx(0.0) and run.curve[-1][1] == pytest.approx(0.0)
        assert run.stall >= 0 and run.copies == copies_per_iteration(expanded)[rank]
        if link is None:
            assert (run.peak_bytes <= plain.peak_bytes + 1e-9
                    and run.finish == pytest.approx(plain.finish))


def test_unit_granularity_in_layer_terms():
    from megatron_offload.schedule.layers import unit_ops_to_layer_ops

    order = [OpKind.FORWARD, OpKind.OFFLOAD, OpKind.FORWARD, OpKind.RELOAD, OpKind.BACKWARD,
             OpKind.BACKWARD]
    units = [0, 0, 1, 0, 0, 1]
    from megatron_offload.schedule.ir import Op

    ops = unit_ops_to_layer_ops([Op(k, 0, u) for k, u in zip(order, units)], 2)
    assert _text(ops) == ("0F0,0F0.0,0F0.1,0O0,0O0.0,0O0.1,0F1,0F1.0,0F1.1,0R0,0R0.1,0R0.0,"
                          "0B0,0B0.1,0B0.0,0B1,0B1.1,0B1.0")
    profile = LayerProfile(rest_bytes=(5,), layer_bytes=((10, 20),))
    sim = simulate_layers(ops, profile)
    # the epilogue runs before the unit's copy: F0.1 30 -> rest 35 -> copies 30, 20, 0; unit 1: 35;
    # reloads 40, 60, 70; backwards free 50, 35 (layer 0 with the rest); unit 1 frees 15, 0
    assert [sim.level_after[i] for i in range(len(ops))] == [0, 10, 35, 30, 20, 0, 0, 10, 35, 40,
                                                             60, 70, 70, 50, 35, 35, 15, 0]
    assert sim.peak_bytes == 70
    # layer streaming of the same units keeps less: layer 0 of unit 1 and unit 0 stream out
    streamed = simulate_layers(expand_rank([Op(k, 0, u) for k, u in zip(order, units)], 2,
                                           streamed={(0, 1)}, offloaded={(0, 0)}), profile)
    assert streamed.peak_bytes < sim.peak_bytes
    # a unit copied out and straight back (the unit runtime allows it) still simulates
    back = unit_ops_to_layer_ops([Op(OpKind.FORWARD, 0, 0), Op(OpKind.OFFLOAD, 0, 0),
                                  Op(OpKind.RELOAD, 0, 0), Op(OpKind.BACKWARD, 0, 0)], 2)
    assert simulate_layers(back, profile).peak_bytes == 35
    with pytest.raises(ScheduleError, match="no compute entry"):
        check_rank(back)
