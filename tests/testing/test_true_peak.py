"""TruePeakMeter: the per-op peak catches a transient that step-boundary sampling misses."""
import torch

from megatron_offload.testing.true_peak import TruePeakMeter


def test_transient_peak_inside_one_step_is_caught():
    w = torch.nn.Parameter(torch.randn(64, 64))
    x = torch.randn(32, 64)
    meter = TruePeakMeter()
    meter.exclude([w])
    with meter:
        meter.start()
        meter.sample_boundary()
        # one "step": a 32x4096 temporary (512 KiB) lives only inside the step
        big = torch.cat([x @ w] * 64, dim=1)
        small = big.sum(dim=1, keepdim=True)  # 128 B kept
        del big
        meter.sample_boundary()
        meter.stop()
    kept = small.untyped_storage().nbytes()
    assert meter.boundary_peak_bytes == kept == 32 * 4
    assert meter.peak_bytes >= 32 * 64 * 64 * 4  # the cat output
    assert meter.peak_bytes < 32 * 64 * 64 * 4 + 64 * 64 * 4  # parameter not counted
    assert meter.ops > 0


def test_resized_storage_counts_its_current_size_and_host_copies_are_separate():
    meter = TruePeakMeter()
    with meter:
        meter.start()
        a = torch.ones(1024)  # 4 KiB tracked
        with meter.untracked():
            host = torch.empty(1024)
            host.copy_(a)
        meter.add_host(host)
        assert meter.live_bytes() == 4096
        a.untyped_storage().resize_(0)  # "offloaded"
        assert meter.live_bytes() == 0
        assert meter.host_bytes() == 4096
        torch.zeros(1)  # any op samples
        meter.stop()
    assert meter.peak_bytes == 4096 and meter.host_peak_bytes == 4096


def test_dead_storages_drop_out():
    meter = TruePeakMeter()
    with meter:
        meter.start()
        t = torch.ones(256)
        assert meter.live_bytes() == 1024
        del t
        assert meter.live_bytes() == 0
        meter.stop()
