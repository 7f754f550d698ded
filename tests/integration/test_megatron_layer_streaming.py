"""Layer streaming (``--offload-granularity layer``) under megatron-core's own schedules.

The same tiny GPT, weights and data run unpatched and with layer streaming in the same four
gloo ranks. Checked per rank and iteration: losses and every gradient bitwise equal; the
runtime issued exactly the layer-level list ``schedule.layers.expand_rank`` gives for the
rank's order (copies included); every copy stayed away while at least one compute entry
ran; what went out came back; and the resident peak at step boundaries is no higher than at
unit granularity, strictly lower on the last rank (whose units have no lifespan, so only
streaming can free anything there).
"""
from __future__ import annotations

import pytest

from megatron_offload.config import OffloadConfig
from megatron_offload.planning.policy import units_to_offload
from megatron_offload.schedule.ir import Op
from megatron_offload.schedule.layers import expand_rank
from megatron_offload.testing.gpt import TinyGPTCase
from megatron_offload.testing.reference import compare_runs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RUN_CASE = "megatron_offload.testing.reference:run_case"


def config(granularity: str, **kw) -> OffloadConfig:
    return OffloadConfig(policy=kw.pop("policy", "full"), granularity=granularity,
                         min_offload_bytes=0, measure_memory=True, **kw)


CASES = [
    pytest.param(TinyGPTCase(pp=4, microbatches=8, num_layers=8), {}, id="pp4-1f1b-full"),
    pytest.param(TinyGPTCase(pp=4, vpp=2, microbatches=8, num_layers=16), {}, id="pp4-vpp2-full"),
    pytest.param(TinyGPTCase(pp=4, vpp=2, microbatches=4, num_layers=16),
                 dict(policy="chunks", offload_chunks=1), id="pp4-vpp2-chunks1"),
    pytest.param(TinyGPTCase(pp=2, microbatches=5, num_layers=6, position_embedding_type="rope",
                             swiglu=True, normalization="RMSNorm", add_bias_linear=False,
                             recompute="selective", recompute_modules=("core_attn",)),
                 {}, id="pp2-1f1b-llama-recompute-core-attn"),
]


@pytest.mark.parametrize("case, knobs", CASES)
def test_layer_streaming_is_bitwise_and_runs_the_layer_list(pool4, case, knobs):
    reference = pool4.run(RUN_CASE, case=case, iterations=3, offload_config=None)
    layers = pool4.run(RUN_CASE, case=case, iterations=3, offload_config=config("layer", **knobs))
    units = pool4.run(RUN_CASE, case=case, iterations=3, offload_config=config("unit", **knobs))
    mismatches = compare_runs(reference, layers)
    assert not mismatches, "\n".join(mismatches[:20])

    layers_per_chunk = case.num_layers // (case.pp * (case.vpp or 1))
    cfg = config("layer", **knobs)
    last = max(r["pp_rank"] for r in layers)
    for rank, unit_rank in zip(sorted(layers, key=lambda r: r["rank"]),
                               sorted(units, key=lambda r: r["rank"])):
        for stats, unit_stats in zip(rank["offload_stats"], unit_rank["offload_stats"]):
            order = [Op.parse(t) for t in stats["rank_order"].split()]
            offload = units_to_offload(order, cfg)
            streamed = {op.unit for op in order if cfg.offloads_chunk(op.chunk)}
            planned = expand_rank(order, layers_per_chunk, streamed=streamed, offloaded=offload)
            assert stats["executed_ops"] == [str(e) for e in planned]
            assert stats["offloaded_bytes"] == stats["reloaded_bytes"] > 0
            assert all(away >= 1 for _, _, away, _ in stats["copies"])
            assert stats["peak_resident_bytes"] <= unit_stats["peak_resident_bytes"]
            if rank["pp_rank"] == last:
                assert stats["peak_resident_bytes"] < unit_stats["peak_resident_bytes"]


def test_full_recompute_streams_nothing_per_layer(pool4):
    """Under full recompute the checkpoint keeps only each layer group's input: no layer hooks,
    the runtime list is the unit-level one."""
    case = TinyGPTCase(pp=4, microbatches=8, num_layers=8, recompute="full")
    reference = pool4.run(RUN_CASE, case=case, iterations=2, offload_config=None)
    layers = pool4.run(RUN_CASE, case=case, iterations=2, offload_config=config("layer"))
    assert not compare_runs(reference, layers)
    for rank in layers:
        for stats in rank["offload_stats"]:
            assert not any("." in op for op in stats["executed_ops"])
