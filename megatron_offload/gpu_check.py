"""GPU check: the offload runtime on CUDA streams and pinned memory, measured.

    python -m megatron_offload.gpu_check [--device cuda] [--json FILE]

One process, one GPU (NCCL refuses two pipeline ranks on one device), so the check drives
pipeline rank 0's real order (Megatron's interleaved 1F1B, PP=4 VPP=2, 8 microbatches: 11
units in flight at the peak) through two model chunks, once without and once with full offload:

1. equivalence: every gradient and loss bitwise identical (torch layers; Transformer Engine
   layers too when transformer_engine is importable);
2. memory: peak ``torch.cuda.max_memory_allocated`` above the weights, with and without;
3. time: iteration time with and without offload (copies overlapped on D2H/H2D streams);
4. link: pinned D2H, H2D and both at once (full duplex) in GB/s through the same backend.

On a machine without a GPU, ``--device cpu`` runs the same code with the CPU backend (the CPU
test suite does), which checks everything but the streams.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from megatron_offload.config import OffloadConfig
from megatron_offload.policy import units_to_offload
from megatron_offload.runtime.offloader import ActivationOffloader
from megatron_offload.runtime.host_pool import CudaHostRegisterPinner, HostBufferPool
from megatron_offload.runtime.transfer import make_backend
from megatron_offload.testing.single_rank import drive, interleaved_rank0_order


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_link(device: torch.device, nbytes: int, repeats: int = 5) -> dict:
    """GB/s of pinned host <-> device copies through the offload backend's streams."""
    backend = make_backend("auto", device)
    pool = HostBufferPool(pinner=CudaHostRegisterPinner() if backend.pin_memory else None)
    source = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    host_out, host_in = pool.acquire(nbytes), pool.acquire(nbytes)
    host_in.random_(0, 255)
    s_src, s_dst = source.untyped_storage(), target.untyped_storage()

    def timed(fn) -> float:
        samples = []
        for _ in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            for transfer in fn():
                backend.wait_host(transfer)
            samples.append(time.perf_counter() - start)
        return statistics.median(samples[1:])

    d2h = timed(lambda: [backend.device_to_host([(s_src, host_out)])])
    h2d = timed(lambda: [backend.host_to_device([(s_dst, host_in)])])
    both = timed(
        lambda: [backend.device_to_host([(s_src, host_out)]), backend.host_to_device([(s_dst, host_in)])]
    )
    ok = bool(torch.equal(host_out, source.cpu())) and bool(torch.equal(target.cpu(), host_in))
    gb = nbytes / 1e9
    return {
        "bytes": nbytes,
        "d2h_gbps": gb / d2h,
        "h2d_gbps": gb / h2d,
        "duplex_gbps_each_way": gb / both,
        "copies_bitwise_ok": ok,
    }


def _torch_chunk(hidden: int, layers: int, dtype, device) -> torch.nn.Module:
    return torch.nn.Sequential(
        *[
            torch.nn.TransformerEncoderLayer(
                hidden, nhead=max(1, hidden // 64), dim_feedforward=4 * hidden, dropout=0.0,
                batch_first=True, norm_first=True, dtype=dtype, device=device,
            )
            for _ in range(layers)
        ]
    )


def _te_chunk(hidden: int, layers: int, dtype, device) -> torch.nn.Module:
    import transformer_engine.pytorch as te

    return torch.nn.Sequential(
        *[
            te.TransformerLayer(
                hidden, 4 * hidden, max(1, hidden // 64), hidden_dropout=0.0,
                attention_dropout=0.0, params_dtype=dtype, device=device.type,
                self_attn_mask_type="causal",
            )
            for _ in range(layers)
        ]
    )


def check_equivalence(
    device: torch.device, *, flavor: str, hidden: int, seq: int, batch: int, layers: int,
    dtype=torch.float32, iterations: int = 3,
) -> dict:
    """Rank 0 of PP=4 VPP=2, m=8: without offload vs full offload, same weights and data."""
    order = interleaved_rank0_order(4, 2, 8)
    build = _te_chunk if flavor == "te" else _torch_chunk
    torch.manual_seed(0)
    chunks = [build(hidden, layers, dtype, device) for _ in range(2)]
    generator = torch.Generator(device="cpu").manual_seed(1)
    shape = (seq, batch, hidden) if flavor == "te" else (batch, seq, hidden)
    inputs = {
        mb: torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)
        for mb in range(8)
    }
    config = OffloadConfig(policy="full", min_offload_bytes=0 if device.type == "cpu" else 64 * 1024)
    offloader = ActivationOffloader(
        config, make_backend("auto", device), device_type=device.type, rank_label="[gpu check] "
    )
    offloader.register_model(chunks)
    offload = units_to_offload(order, config)
    reference_runs, offload_runs = [], []
    for _ in range(iterations):  # alternate, so warm-up and clocks hit both alike
        _sync(device)
        start = time.perf_counter()
        reference_runs.append(drive(chunks, order, inputs, peak_memory=True))
        _sync(device)
        reference_runs[-1]["time_s"] = time.perf_counter() - start
        start = time.perf_counter()
        offload_runs.append(drive(chunks, order, inputs, offloader, offload, peak_memory=True))
        _sync(device)
        offload_runs[-1]["time_s"] = time.perf_counter() - start
    identical = all(
        all(torch.equal(a, b) for a, b in zip(ref["grads"], got["grads"]))
        and all(torch.equal(a, b) for a, b in zip(ref["losses"], got["losses"]))
        for ref, got in zip(reference_runs, offload_runs)
    )
    stats = offloader.iteration_stats
    result = {
        "flavor": flavor,
        "dtype": str(dtype).replace("torch.", ""),
        "hidden": hidden, "seq": seq, "batch": batch, "layers_per_chunk": layers,
        "bitwise_identical": identical,
        "offloaded_bytes_per_iteration": stats[-1].offloaded_bytes,
        "host_pool_bytes": [s.host_pool_bytes for s in stats],
        "time_s_without": statistics.median(r["time_s"] for r in reference_runs[1:] or reference_runs),
        "time_s_with": statistics.median(r["time_s"] for r in offload_runs[1:] or offload_runs),
    }
    if device.type == "cuda":
        result["peak_bytes_without"] = reference_runs[-1]["peak_bytes"]
        result["peak_bytes_with"] = offload_runs[-1]["peak_bytes"]
    return result


def run_checks(device: torch.device, *, small: bool = False) -> dict:
    report = {"device": str(device), "torch": torch.__version__, "checks": []}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    size = dict(hidden=64, seq=32, batch=2, layers=1) if small else dict(hidden=2048, seq=2048, batch=2, layers=2)
    report["link"] = measure_link(device, (1 << 20) if small else (1 << 30))
    report["checks"].append(check_equivalence(device, flavor="torch", **size))
    if device.type == "cuda":
        report["checks"].append(check_equivalence(device, flavor="torch", dtype=torch.bfloat16, **size))
        try:
            import transformer_engine.pytorch  # noqa: F401
        except ImportError:
            report["transformer_engine"] = "not installed: TE check skipped"
        else:
            report["checks"].append(
                check_equivalence(device, flavor="te", dtype=torch.bfloat16, **size)
            )
    return report


def format_report(report: dict) -> str:
    link = report["link"]
    lines = [
        f"device {report['device']} {report.get('gpu', '')} torch {report['torch']}",
        f"link (pinned, {link['bytes'] / 2**20:.0f} MiB): D2H {link['d2h_gbps']:.1f} GB/s, "
        f"H2D {link['h2d_gbps']:.1f} GB/s, both at once {link['duplex_gbps_each_way']:.1f} GB/s "
        f"each way, copies exact: {link['copies_bitwise_ok']}",
        "flavor dtype     bitwise  peak w/o MiB  peak with MiB  time w/o s  time with s  offloaded MiB",
    ]
    for c in report["checks"]:
        lines.append(
            f"{c['flavor']:<6} {c['dtype']:<9} {str(c['bitwise_identical']):<8} "
            f"{c.get('peak_bytes_without', 0) / 2**20:12.1f}  {c.get('peak_bytes_with', 0) / 2**20:13.1f}  "
            f"{c['time_s_without']:10.4f}  {c['time_s_with']:11.4f}  "
            f"{c['offloaded_bytes_per_iteration'] / 2**20:13.1f}"
        )
    if "transformer_engine" in report:
        lines.append(report["transformer_engine"])
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny sizes (CPU smoke run)")
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU; use --device cpu")
    report = run_checks(device, small=args.small)
    print(format_report(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
    return 0 if all(c["bitwise_identical"] for c in report["checks"]) and report["link"]["copies_bitwise_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
