"""Measure this node's host link (and GPU matmul rate) through the offload backend's streams.

:func:`measure_link`: GB/s of pinned host <-> device copies, each direction alone and both at
once, through :func:`~megatron_offload.runtime.transfer.make_backend`'s copy streams and a
pinned :class:`~megatron_offload.runtime.host_pool.HostBufferPool` (what offload itself uses).
:func:`cuda_device_probe`: the fields of a
:class:`~megatron_offload.planning.hardware.DeviceMeasurement` (the link and a bf16 matmul),
for ``hardware.measure_device(probe=cuda_device_probe)``. CUDA only: RuntimeError elsewhere.
"""
from __future__ import annotations

import statistics
import time

import torch

from megatron_offload.runtime.host_pool import CudaHostRegisterPinner, HostBufferPool
from megatron_offload.runtime.transfer import make_backend


def synchronize(device: torch.device) -> None:
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
            synchronize(device)
            start = time.perf_counter()
            for transfer in fn():
                backend.wait_host(transfer)
            samples.append(time.perf_counter() - start)
        return statistics.median(samples[1:])

    d2h = timed(lambda: [backend.device_to_host([(s_src, host_out)])])
    h2d = timed(lambda: [backend.host_to_device([(s_dst, host_in)])])
    both = timed(
        lambda: [
            backend.device_to_host([(s_src, host_out)]),
            backend.host_to_device([(s_dst, host_in)]),
        ]
    )
    ok = bool(torch.equal(host_out, source.cpu())) and bool(torch.equal(target.cpu(), host_in))
    pool.release(host_out)
    pool.release(host_in)
    pool.clear()  # unpin now: the checks after this one pin their own pools
    gb = nbytes / 1e9
    return {
        "bytes": nbytes,
        "d2h_gbps": gb / d2h,
        "h2d_gbps": gb / h2d,
        "duplex_gbps_each_way": gb / both,
        "copies_bitwise_ok": ok,
    }


def cuda_device_probe(copy_bytes: int = 1 << 28, matmul_size: int = 8192,
                      repeats: int = 10) -> dict:  # pragma: no cover - needs a GPU
    if not torch.cuda.is_available():
        raise RuntimeError("measure_device needs a CUDA GPU; on this machine give --gpu PRESET or "
                           "--gpu-memory-gib, --gpu-tflops, --host-link-gbps")
    device = torch.device("cuda", torch.cuda.current_device())
    link = measure_link(device, copy_bytes)
    a = torch.randn(matmul_size, matmul_size, device=device, dtype=torch.bfloat16)
    b = torch.randn(matmul_size, matmul_size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / repeats
    props = torch.cuda.get_device_properties(device)
    return {
        "gpu_name": props.name, "gpu_memory_gib": props.total_memory / 2**30,
        "d2h_gbps": link["d2h_gbps"], "h2d_gbps": link["h2d_gbps"],
        "duplex_gbps_each_way": link["duplex_gbps_each_way"],
        "matmul_tflops": 2 * matmul_size**3 / seconds / 1e12, "copy_bytes": copy_bytes,
    }
