"""Hardware presets, user values and the cached device measurement (with a fake probe)."""
from __future__ import annotations

import json
from dataclasses import fields

import pytest

from megatron_offload.planning import hardware as hwmod
from megatron_offload.planning.hardware import (
    PRESETS,
    DeviceMeasurement,
    Hardware,
    hardware_from_args,
    measure_device,
)

NUMERIC = ("gpu_memory_gib", "peak_tflops", "achieved_tflops", "host_link_gbps",
           "host_link_alone_gbps", "host_memory_gib")


def test_presets_are_the_issues_and_every_fact_has_a_source():
    assert set(PRESETS) == {"a100-80g", "h100-80g", "h200", "gh200", "b200"}
    for name, hw in PRESETS.items():
        assert hw.name == name
        for key in NUMERIC:
            if getattr(hw, key) is not None:
                assert key in hw.sources, (name, key)
        # all GPUs of a node copying at once never see more than one GPU alone
        assert hw.host_link_gbps <= hw.host_link_alone_gbps
        assert hw.achieved_tflops < hw.peak_tflops


def test_a100_preset_carries_the_papers_constants():
    a100 = PRESETS["a100-80g"]
    assert (a100.achieved_tflops, a100.host_link_gbps) == (220.0, 15.0)


def test_user_values_over_a_preset_and_alone():
    hw = hardware_from_args("h100-80g", host_link_gbps=20.0, gpus_per_node=4)
    assert (hw.host_link_gbps, hw.gpus_per_node, hw.gpu_memory_gib) == (
        20.0, 4, PRESETS["h100-80g"].gpu_memory_gib)
    assert hw.sources["host_link_gbps"] == "user"
    alone = hardware_from_args(gpu_memory_gib=40, gpu_tflops=100, host_link_gbps=10)
    assert alone.name == "user" and alone.host_memory_gib is None
    assert hardware_from_args("h200") is PRESETS["h200"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(gpu_memory_gib=40, gpu_tflops=100), "--host-link-gbps"),
    (dict(), "--gpu-memory-gib"),
    (dict(gpu="v100"), "not a preset"),
    (dict(gpu="h200", gpu_tflops=-1.0), "--gpu-tflops"),
])
def test_missing_or_bad_values_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hardware_from_args(**kwargs)


def test_host_memory_from_proc(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       2097152 kB\nMemFree: 1 kB\n")
    assert hwmod.host_memory_from_proc(str(meminfo)) == 2.0
    assert hwmod.host_memory_from_proc(str(tmp_path / "absent")) is None
    assert hwmod.host_memory_from_proc() is None or hwmod.host_memory_from_proc() > 0


class _FakeProbe:
    def __init__(self, gbps=25.0):
        self.calls, self.gbps = 0, gbps

    def __call__(self):
        self.calls += 1
        return {"gpu_name": "Fake GPU", "gpu_memory_gib": 80.0, "d2h_gbps": self.gbps,
                "h2d_gbps": self.gbps + 1, "duplex_gbps_each_way": self.gbps - 5,
                "matmul_tflops": 700.0, "copy_bytes": 1 << 20}


def test_measurement_is_cached_per_node(tmp_path):
    probe = _FakeProbe()
    first = measure_device(probe=probe, directory=tmp_path, host="node-a")
    assert probe.calls == 1 and first.host == "node-a" and first.d2h_gbps == 25.0
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == ["device-node-a.json"]
    assert json.loads(files[0].read_text())["gpu_name"] == "Fake GPU"
    again = measure_device(probe=probe, directory=tmp_path, host="node-a")
    assert probe.calls == 1 and again == first  # read from the cache, not measured
    # another node, own file
    other = measure_device(probe=_FakeProbe(40.0), directory=tmp_path, host="node/b")
    assert other.d2h_gbps == 40.0 and (tmp_path / "device-node_b.json").exists()
    fresh = measure_device(probe=_FakeProbe(30.0), directory=tmp_path, host="node-a", refresh=True)
    assert fresh.d2h_gbps == 30.0
    assert measure_device(probe=probe, directory=tmp_path, host="node-a").d2h_gbps == 30.0


def test_unreadable_cache_is_measured_again(tmp_path):
    (tmp_path / "device-n.json").write_text("{not json")
    probe = _FakeProbe()
    assert (measure_device(probe=probe, directory=tmp_path, host="n").gpu_name == "Fake GPU"
            and probe.calls == 1)
    (tmp_path / "device-n.json").write_text(json.dumps({"unexpected": 1}))
    assert (measure_device(probe=probe, directory=tmp_path, host="n").gpu_name == "Fake GPU"
            and probe.calls == 2)


def test_measurement_becomes_hardware(tmp_path):
    measured = measure_device(probe=_FakeProbe(), directory=tmp_path, host="n")
    hw = measured.to_hardware(model_efficiency=0.5, gpus_per_node=4, host_memory_gib=512)
    assert isinstance(hw, Hardware)
    assert (hw.achieved_tflops, hw.host_link_gbps, hw.gpus_per_node, hw.host_memory_gib) == (
        350.0, 20.0, 4, 512)
    assert {f.name for f in fields(DeviceMeasurement)} >= {
        "d2h_gbps", "h2d_gbps", "duplex_gbps_each_way", "matmul_tflops"}
