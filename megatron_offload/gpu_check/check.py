"""GPU check: the offload runtime on CUDA streams and pinned memory, measured, with a verdict.

    python -m megatron_offload.gpu_check [--device cuda] [--json FILE] [--rows NAMES]

One process, one GPU (NCCL refuses two pipeline ranks on one device), so every check drives
pipeline rank 0's real order (Megatron's interleaved 1F1B, PP=4 VPP=2, 8 microbatches: 11
units in flight at the peak) through two model chunks, once without and once with full offload:

1. link: pinned D2H, H2D and both at once (full duplex) in GB/s through the offload backend;
2. checks: plain torch layers (and ``te.TransformerLayer`` when Transformer Engine is there),
   driven by ``runtime.single_rank.drive``;
3. rows (``gpu_rows.py``): megatron-core model chunks in DDP with ``overlap_grad_reduce``,
   fused wgrad accumulation, Adam between iterations; local spec fp32, TE bf16 with fused RoPE,
   TE FP8.

For each: every loss and gradient bitwise identical, peak ``torch.cuda.max_memory_allocated``
above the start of the iteration with and without offload, bytes offloaded and reloaded in
each iteration, the host pool's size, and iteration time with and without.

The verdict is :func:`problems` (empty = pass). Exit status: 0 pass; 1 a problem (results
differ, memory not freed, bytes offloaded but not reloaded, the host pool grew or is not
pinned, a check raised); 3 no problem, but some row could not run here (``not_run``: not a
pass; ``--allow-not-run`` makes it 0); 2 is argparse's usage error.

On a machine without a GPU, ``--device cpu`` runs the same code with the CPU backend (the CPU
test suite does), which checks everything but the streams and the device memory.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
import traceback

# Before Transformer Engine is imported anywhere: TE's attention backward must be deterministic
# for a bitwise comparison to mean anything (``gpu_rows`` sets it too).
os.environ.setdefault("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")

import torch  # noqa: E402

from megatron_offload.config import OffloadConfig
from megatron_offload.gpu_check import rows as gpu_rows  # noqa: E402
from megatron_offload.planning.policy import units_to_offload
from megatron_offload.runtime.link_probe import measure_link, synchronize
from megatron_offload.runtime.offloader import ActivationOffloader
from megatron_offload.runtime.single_rank import drive, interleaved_rank0_order
from megatron_offload.runtime.transfer import make_backend


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


def _attention_backend(device: torch.device, flavor: str):
    """torch layers on CUDA: the math attention backend. PyTorch's flash and memory-efficient
    attention backward accumulate with atomics unless ``torch.use_deterministic_algorithms(True)``
    (strict) is on, so two runs would differ by rounding, offload or not."""
    if device.type == "cuda" and flavor == "torch":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


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
    config = OffloadConfig(
        policy="full", min_offload_bytes=0 if device.type == "cpu" else 64 * 1024
    )
    offloader = ActivationOffloader(
        config, make_backend("auto", device), device_type=device.type, rank_label="[gpu check] "
    )
    offloader.register_model(chunks)
    offload = units_to_offload(order, config)
    reference_runs, offload_runs, pool = [], [], []
    attention = _attention_backend(device, flavor)
    for _ in range(iterations):  # alternate, so warm-up and clocks hit both alike
        synchronize(device)
        start = time.perf_counter()
        with attention:
            reference_runs.append(drive(chunks, order, inputs, peak_memory=True))
        synchronize(device)
        reference_runs[-1]["time_s"] = time.perf_counter() - start
        start = time.perf_counter()
        with attention:
            offload_runs.append(drive(chunks, order, inputs, offloader, offload, peak_memory=True))
        synchronize(device)
        offload_runs[-1]["time_s"] = time.perf_counter() - start
        pool.append((offloader.pool.capacity_bytes, offloader.pool.pinned_bytes))
    identical = all(
        all(torch.equal(a, b) for a, b in zip(ref["grads"], got["grads"]))
        and all(torch.equal(a, b) for a, b in zip(ref["losses"], got["losses"]))
        for ref, got in zip(reference_runs, offload_runs)
    )
    stats = list(offloader.iteration_stats)[-iterations:]
    steady = slice(1, None) if iterations > 1 else slice(None)
    result = {
        "name": f"{flavor}_{str(dtype).replace('torch.', '')}",
        "flavor": flavor,
        "dtype": str(dtype).replace("torch.", ""),
        "hidden": hidden, "seq": seq, "batch": batch, "layers_per_chunk": layers,
        "bitwise_identical": identical,
        "offloaded_bytes": [s.offloaded_bytes for s in stats],
        "reloaded_bytes": [s.reloaded_bytes for s in stats],
        "offloaded_units": [s.offloaded_units for s in stats],
        "host_pool_bytes": [capacity for capacity, _ in pool],
        "host_pool_pinned_bytes": [pinned for _, pinned in pool],
        "time_s_without": statistics.median(r["time_s"] for r in reference_runs[steady]),
        "time_s_with": statistics.median(r["time_s"] for r in offload_runs[steady]),
    }
    if device.type == "cuda":  # steady state: the last iteration
        result["peak_bytes_without_each"] = [r["peak_bytes"] for r in reference_runs]
        result["peak_bytes_with_each"] = [r["peak_bytes"] for r in offload_runs]
        result["peak_bytes_without"] = reference_runs[-1]["peak_bytes"]
        result["peak_bytes_with"] = offload_runs[-1]["peak_bytes"]
    offloader.close()
    return result


CHECK_SIZE_SMALL = dict(hidden=64, seq=32, batch=2, layers=1)
CHECK_SIZE_GPU = dict(hidden=2048, seq=1024, batch=2, layers=2)


def _guarded(name: str, run) -> dict:
    """Run one check; an exception becomes an entry with its error (a problem), not an abort."""
    try:
        return run()
    except Exception as exc:
        return {"name": name, "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=-12)}


def run_checks(
    device: torch.device, *, small: bool = False, rows=gpu_rows.ROW_NAMES, iterations: int = 3,
    rows_dist_backend: str | None = None,
) -> dict:
    """Link, checks and rows; ``report["problems"]`` is the verdict (empty = pass)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    report = {"device": str(device), "torch": torch.__version__, "checks": [], "rows": []}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
        report["torch_cuda"] = torch.version.cuda
    size = CHECK_SIZE_SMALL if small else CHECK_SIZE_GPU
    link = _guarded("link", lambda: measure_link(device, (1 << 20) if small else (1 << 30)))
    if "error" in link:
        report["checks"].append(link)
        link = None
    report["link"] = link
    checks = [("torch_float32", dict(flavor="torch"))]
    if device.type == "cuda":
        checks.append(("torch_bfloat16", dict(flavor="torch", dtype=torch.bfloat16)))
        try:
            import transformer_engine.pytorch  # noqa: F401
        except Exception as exc:  # ImportError, or a TE built for another torch / CUDA
            report["checks"].append(
                {"name": "te_bfloat16", "not_run": f"transformer_engine not importable: {exc}"}
            )
        else:
            checks.append(("te_bfloat16", dict(flavor="te", dtype=torch.bfloat16)))
    for name, kwargs in checks:
        report["checks"].append(_guarded(
            name,
            lambda kwargs=kwargs: check_equivalence(
                device, iterations=iterations, **kwargs, **size
            ),
        ))
        _release(device)
    if rows:
        report["rows"] = gpu_rows.run_rows(
            device, gpu_rows.SMALL if small else gpu_rows.GPU, rows, iterations=iterations,
            dist_backend=rows_dist_backend,
        )
    report["problems"] = problems(report)
    report["not_run"] = not_run(report)
    return report


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------- verdict
def _entries(report: dict) -> list[dict]:
    return list(report.get("checks", [])) + list(report.get("rows", []))


def _label(entry: dict) -> str:
    return entry.get("row") or entry.get("name") or f"{entry.get('flavor')} {entry.get('dtype')}"


def not_run(report: dict) -> list[str]:
    """Checks and rows that could not run here, with the reason: not a pass, not a failure."""
    return [f"{_label(e)}: {e['not_run']}" for e in _entries(report) if "not_run" in e]


def problems(report: dict) -> list[str]:
    """Everything that makes this run fail; empty means pass.

    On every device: a check or row that raised; results not bitwise identical; an
    iteration that offloaded nothing, or whose reloaded bytes differ from its offloaded bytes;
    the host pool growing after iteration 0; pinned host copies not exact. On CUDA also: no
    peak measured, or the peak with offload not below the peak without (memory not freed);
    the host pool's pinned bytes differing from its capacity.
    """
    found = []
    link = report.get("link")
    if link is not None and not link.get("copies_bitwise_ok", False):
        found.append("link: pinned D2H/H2D copies are not bitwise exact")
    cuda = str(report.get("device", "")).startswith("cuda")
    entries = _entries(report)
    if not entries:
        found.append("nothing was checked")
    for entry in entries:
        name = _label(entry)
        if "not_run" in entry:
            continue
        if "error" in entry:
            found.append(f"{name}: raised {entry['error']}")
            continue
        if entry.get("bitwise_identical") is not True:
            detail = "; ".join(entry.get("differences", [])[:3])
            found.append(f"{name}: results with offload are not bitwise identical"
                         + (f" ({detail})" if detail else ""))
        if entry.get("step_ok") is not None and not all(entry["step_ok"]):
            found.append(f"{name}: the optimizer step failed in an iteration: {entry['step_ok']}")
        offloaded = list(entry.get("offloaded_bytes") or [])
        reloaded = list(entry.get("reloaded_bytes") or [])
        if not offloaded:
            found.append(f"{name}: no offload statistics")
        for i, sent in enumerate(offloaded):
            if sent <= 0:
                found.append(f"{name}: iteration {i} offloaded nothing")
            back = reloaded[i] if i < len(reloaded) else None
            if back != sent:
                found.append(f"{name}: iteration {i} offloaded {sent} B but reloaded {back} B")
        pool = list(entry.get("host_pool_bytes") or [])
        if pool and any(b > pool[0] for b in pool[1:]):
            found.append(f"{name}: host pool grew after iteration 0: {pool} B")
        if cuda:
            pinned = list(entry.get("host_pool_pinned_bytes") or [])
            if len(pinned) != len(pool) or pinned != pool:
                found.append(
                    f"{name}: host pool pinned bytes {pinned} differ from its capacity {pool}"
                )
            without, with_ = entry.get("peak_bytes_without"), entry.get("peak_bytes_with")
            if without is None or with_ is None:
                found.append(f"{name}: peak device memory not measured")
            elif with_ >= without:
                found.append(
                    f"{name}: memory not freed: peak with offload {with_ / 2**20:.1f} MiB >= "
                    f"without {without / 2**20:.1f} MiB"
                )
    return found


EXIT_PASS, EXIT_PROBLEM, EXIT_INCOMPLETE = 0, 1, 3
"""Exit statuses (2 is argparse's usage error)."""


def exit_status(report: dict, *, allow_not_run: bool = False) -> int:
    """0 pass, 1 a problem, 3 no problem but something did not run (not a pass)."""
    if problems(report):
        return EXIT_PROBLEM
    if not_run(report) and not allow_not_run:
        return EXIT_INCOMPLETE
    return EXIT_PASS


def _mib(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_report(report: dict) -> str:
    link = report.get("link")
    lines = [
        f"device {report['device']} {report.get('gpu', '')} torch {report['torch']}",
        "link: not measured" if link is None else (
            f"link (pinned, {link['bytes'] / 2**20:.0f} MiB): D2H {link['d2h_gbps']:.1f} GB/s, "
            f"H2D {link['h2d_gbps']:.1f} GB/s, both at once {link['duplex_gbps_each_way']:.1f} "
            f"GB/s each way, copies exact: {link['copies_bitwise_ok']}"
        ),
        f"{'check / row':<14} {'dtype':<9} {'bitwise':<8} {'peak w/o MiB':>12} "
        f"{'peak with MiB':>13} {'time w/o s':>10} {'time with s':>11} "
        f"{'offloaded MiB':>13} {'reloaded MiB':>12}",
    ]
    for e in _entries(report):
        if "not_run" in e or "error" in e:
            continue
        sent = (e.get("offloaded_bytes") or [None])[-1]
        back = (e.get("reloaded_bytes") or [None])[-1]
        lines.append(
            f"{_label(e):<14} {e.get('dtype', '?'):<9} {str(e.get('bitwise_identical')):<8} "
            f"{_mib(e.get('peak_bytes_without')):>12} {_mib(e.get('peak_bytes_with')):>13} "
            f"{_seconds(e.get('time_s_without')):>10} {_seconds(e.get('time_s_with')):>11} "
            f"{_mib(sent):>13} {_mib(back):>12}"
        )
    for e in report.get("rows", []):
        if "wgrad_kernel" in e:
            lines.append(f"  {e['row']}: fused wgrad: {e['wgrad_kernel']}")
    found = problems(report)
    missing = not_run(report)
    for line in missing:
        lines.append(f"NOT RUN (not a pass): {line}")
    for e in _entries(report):
        if "error" in e and e.get("traceback"):
            lines.append(f"{_label(e)} raised:\n{e['traceback']}")
    if found:
        lines.append(f"FAIL: {len(found)} problem(s)")
        lines.extend(f"  - {p}" for p in found)
    elif missing:
        lines.append("NO PROBLEM FOUND, BUT INCOMPLETE: see NOT RUN above")
    else:
        lines.append("PASS")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny sizes (CPU smoke run)")
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON")
    parser.add_argument(
        "--rows", default=",".join(gpu_rows.ROW_NAMES),
        help=(
            "comma-separated rows to run, or 'none' "
            f"(default: all of {', '.join(gpu_rows.ROW_NAMES)})"
        ),
    )
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument(
        "--rows-dist-backend", choices=("nccl", "gloo"), default=None,
        help="process group of the rows' world of one (default: nccl on CUDA, gloo on CPU)",
    )
    parser.add_argument(
        "--allow-not-run", action="store_true",
        help="exit 0 (not 3) when no problem was found but some row could not run here",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU; use --device cpu")
    rows = () if args.rows in ("", "none") else tuple(args.rows.split(","))
    unknown = set(rows) - set(gpu_rows.ROW_NAMES)
    if unknown:
        parser.error(
            f"--rows: unknown {sorted(unknown)}; choose from {', '.join(gpu_rows.ROW_NAMES)}"
        )
    if args.iterations < 2:
        parser.error("--iterations must be >= 2 (iteration 0 is the shadow iteration)")
    report = run_checks(device, small=args.small, rows=rows, iterations=args.iterations,
                        rows_dist_backend=args.rows_dist_backend)
    print(format_report(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2, default=str)
    return exit_status(report, allow_not_run=args.allow_not_run)


if __name__ == "__main__":
    sys.exit(main())
