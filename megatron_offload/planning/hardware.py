"""GPU and host-link facts: presets from public specifications, user-given values, a measurement.

A :class:`Hardware` is what the planner needs from a machine: GPU memory, a compute rate the
job achieves, the host link per direction *as one GPU sees it when every GPU of the node copies
at once* (offload runs on all pipeline ranks together), host RAM per node and GPUs per node.

Three sources, in the planner's order of preference: values the user gives
(``--gpu-memory-gib``, ``--gpu-tflops``, ``--host-link-gbps``, ``--host-memory-gib``), a
measurement on this node (:func:`measure_device`, CUDA only, cached as JSON under
``~/.cache/megatron-offload``), and the presets below. Preset numbers marked "estimate" are not
published facts: measure them (``python -m megatron_offload.cli.hardware --measure``) or give them.
Nothing is chosen by detecting hardware: the user names a preset or gives values.
"""
from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

GB = 1e9


@dataclass(kw_only=True, frozen=True, slots=True)
class Hardware:
    name: str
    gpu_memory_gib: float
    """Device memory as the driver reports it (nvidia-smi's total), GiB."""
    achieved_tflops: float
    """Dense bf16 rate a transformer layer's forward + backward achieves (model FLOPs / time),
    TFLOP/s: the compute rate in k. Realistic training runs reach 40-60% of peak."""
    host_link_gbps: float
    """Host link per direction per GPU when all GPUs of the node copy at once, GB/s (1e9 B/s)."""
    peak_tflops: float | None = None
    """Dense bf16 tensor-core peak (datasheet), TFLOP/s; informative."""
    host_link_alone_gbps: float | None = None
    """Host link per direction when one GPU copies alone, GB/s; informative."""
    host_memory_gib: float | None = None
    """Host RAM per node, GiB; None = not public (give --host-memory-gib)."""
    gpus_per_node: int = 8
    sources: dict = field(default_factory=dict, compare=False)
    """Field -> where the value comes from (datasheet, paper, estimate, user, measured)."""

    def __post_init__(self) -> None:
        for flag, value in (("--gpu-memory-gib", self.gpu_memory_gib),
                            ("--gpu-tflops", self.achieved_tflops),
                            ("--host-link-gbps", self.host_link_gbps)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{flag} {value!r} must be a number > 0")
        if self.host_memory_gib is not None and not self.host_memory_gib > 0:
            raise ValueError(f"--host-memory-gib {self.host_memory_gib!r} must be > 0")
        if not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 1:
            raise ValueError(f"--gpus-per-node {self.gpus_per_node!r} must be a positive integer")

    @property
    def link_bytes_per_s(self) -> float:
        return self.host_link_gbps * GB

    def describe(self) -> str:
        host = (f"{self.host_memory_gib:g} GiB host RAM per node" if self.host_memory_gib
                else "host RAM not given")
        return (f"{self.name}: {self.gpu_memory_gib:g} GiB, "
                f"{self.achieved_tflops:g} TFLOP/s achieved"
                f"{f' (peak {self.peak_tflops:g})' if self.peak_tflops else ''}, "
                f"host link {self.host_link_gbps:g} GB/s per direction "
                f"with all {self.gpus_per_node} GPUs copying"
                f"{f' ({self.host_link_alone_gbps:g} alone)' if self.host_link_alone_gbps else ''}"
                f", {host}")


_DGX_LINK_NOTE = ("measured on 8-GPU H100/H200 nodes (the PipeOffload reference code's setting): "
                  "one GPU alone ~50-55 GB/s per direction on an 8-GPU H100/H200 node, "
                  "~32 GB/s each when all copy")

PRESETS: dict[str, Hardware] = {
    "a100-80g": Hardware(
        name="a100-80g",
        gpu_memory_gib=80.0,  # A100-SXM4-80GB: nvidia-smi total 81920 MiB
        peak_tflops=312.0,  # NVIDIA A100 datasheet: BF16 tensor core 312 TFLOP/s dense (624 sparse)
        achieved_tflops=220.0,  # PipeOffload paper (ICML 2025), B_c for A100
        host_link_gbps=15.0,  # PipeOffload paper, B_o for A100 (all GPUs copying)
        # estimate: PCIe Gen4 x16 is 32 GB/s per direction raw; pinned copies reach ~25
        host_link_alone_gbps=25.0,
        # DGX A100 640GB datasheet: 2 TB system memory (the 320GB model has 1 TB)
        host_memory_gib=2048.0,
        gpus_per_node=8,  # DGX A100: 8 GPUs
        sources={"gpu_memory_gib": "datasheet", "peak_tflops": "datasheet",
                 "achieved_tflops": "paper", "host_link_gbps": "paper",
                 "host_link_alone_gbps": "estimate",
                 "host_memory_gib": "datasheet (DGX A100 640GB)"},
    ),
    "h100-80g": Hardware(
        name="h100-80g",
        gpu_memory_gib=79.6,  # H100 SXM5 80GB: nvidia-smi total 81559 MiB
        peak_tflops=989.0,  # NVIDIA H100 SXM datasheet: BF16 989 TFLOP/s dense (1,979 sparse)
        achieved_tflops=440.0,  # PipeOffload reference code's H100 constant, ~45% of peak
        # all 8 GPUs of the node copying (_DGX_LINK_NOTE); PCIe Gen5 x16 is 64 GB/s raw per
        # direction
        host_link_gbps=32.0,
        host_link_alone_gbps=53.0,  # 50-55 GB/s for one GPU alone (_DGX_LINK_NOTE)
        host_memory_gib=2048.0,  # DGX H100 datasheet: 2 TB system memory
        gpus_per_node=8,  # DGX H100 / HGX H100: 8 GPUs
        sources={"gpu_memory_gib": "datasheet", "peak_tflops": "datasheet",
                 "achieved_tflops": "reference code", "host_link_gbps": _DGX_LINK_NOTE,
                 "host_link_alone_gbps": _DGX_LINK_NOTE, "host_memory_gib": "datasheet (DGX H100)"},
    ),
    "h200": Hardware(
        name="h200",
        gpu_memory_gib=140.4,  # H200 SXM 141GB: nvidia-smi total 143771 MiB
        # NVIDIA H200 datasheet: BF16 989 TFLOP/s dense (1,979 sparse), the H100's tensor cores
        peak_tflops=989.0,
        # estimate: as H100 (same compute; more memory bandwidth helps little in big GEMMs)
        achieved_tflops=440.0,
        host_link_gbps=32.0,  # H100/H200 nodes, all 8 GPUs copying (_DGX_LINK_NOTE)
        host_link_alone_gbps=53.0,  # _DGX_LINK_NOTE
        host_memory_gib=2048.0,  # DGX H200 datasheet: 2 TB system memory
        gpus_per_node=8,  # DGX H200 / HGX H200: 8 GPUs
        sources={"gpu_memory_gib": "datasheet", "peak_tflops": "datasheet",
                 "achieved_tflops": "estimate", "host_link_gbps": _DGX_LINK_NOTE,
                 "host_link_alone_gbps": _DGX_LINK_NOTE, "host_memory_gib": "datasheet (DGX H200)"},
    ),
    "gh200": Hardware(
        name="gh200",
        # GH200 96GB HBM3 datasheet (about 95 GiB usable; the 144GB HBM3e model: give
        # --gpu-memory-gib)
        gpu_memory_gib=95.0,
        peak_tflops=989.0,  # NVIDIA GH200 datasheet: BF16 989 TFLOP/s dense (H100 tensor cores)
        achieved_tflops=440.0,  # estimate: as H100
        # estimate: NVLink-C2C is 900 GB/s total = 450 per direction raw; ~80% of it
        host_link_gbps=360.0,
        host_link_alone_gbps=360.0,  # each superchip has its own C2C link: no sharing between GPUs
        # GH200 datasheet: up to 480 GB LPDDR5X per superchip (= 447 GiB); systems ship less
        host_memory_gib=447.0,
        gpus_per_node=1,  # counted per superchip: each GPU has its own host memory and link
        sources={"gpu_memory_gib": "datasheet", "peak_tflops": "datasheet",
                 "achieved_tflops": "estimate",
                 "host_link_gbps": "estimate (NVLink-C2C 900 GB/s datasheet)",
                 "host_link_alone_gbps": "estimate",
                 "host_memory_gib": "datasheet maximum (check your system)"},
    ),
    "b200": Hardware(
        name="b200",
        # DGX B200 datasheet: 1,440 GB for 8 GPUs = 180 GB each (about 179 GiB reported)
        gpu_memory_gib=179.0,
        peak_tflops=2250.0,  # NVIDIA HGX B200 spec: BF16 4.5 PFLOP/s with sparsity = 2.25 dense
        achieved_tflops=1000.0,  # estimate: ~45% of peak, as H100's 440 / 989
        # estimate: PCIe Gen5 x16 to the host as on DGX H100 (_DGX_LINK_NOTE's numbers)
        host_link_gbps=32.0,
        host_link_alone_gbps=53.0,  # estimate: as H100
        host_memory_gib=2048.0,  # DGX B200 datasheet: 2 TB system memory (up to 4 TB)
        gpus_per_node=8,  # DGX B200: 8 GPUs
        sources={"gpu_memory_gib": "datasheet", "peak_tflops": "datasheet",
                 "achieved_tflops": "estimate", "host_link_gbps": "estimate",
                 "host_link_alone_gbps": "estimate", "host_memory_gib": "datasheet (DGX B200)"},
    ),
}


def preset(name: str) -> Hardware:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"--gpu {name!r} is not a preset; choose one of {', '.join(PRESETS)}, "
                         "or give --gpu-memory-gib, --gpu-tflops and --host-link-gbps") from None


def hardware_from_args(gpu: str | None = None, *, gpu_memory_gib: float | None = None,
                       gpu_tflops: float | None = None, host_link_gbps: float | None = None,
                       host_memory_gib: float | None = None,
                       gpus_per_node: int | None = None) -> Hardware:
    """A preset (``--gpu``) with the user's values over it, or the user's values alone (then
    memory, compute rate and link are all required)."""
    given = {"gpu_memory_gib": gpu_memory_gib, "achieved_tflops": gpu_tflops,
             "host_link_gbps": host_link_gbps, "host_memory_gib": host_memory_gib,
             "gpus_per_node": gpus_per_node}
    given = {key: value for key, value in given.items() if value is not None}
    if gpu is not None:
        base = preset(gpu)
        if not given:
            return base
        sources = dict(base.sources, **{key: "user" for key in given})
        return replace(base, name=f"{base.name} (with user values)", sources=sources, **given)
    missing = [flag for flag, key in (("--gpu-memory-gib", "gpu_memory_gib"),
                                      ("--gpu-tflops", "achieved_tflops"),
                                      ("--host-link-gbps", "host_link_gbps")) if key not in given]
    if missing:
        raise ValueError(f"give --gpu PRESET ({', '.join(PRESETS)}) or all of --gpu-memory-gib, "
                         f"--gpu-tflops, --host-link-gbps (missing: {', '.join(missing)})")
    return Hardware(name="user", sources={key: "user" for key in given}, **given)


def host_memory_from_proc(path: str = "/proc/meminfo") -> float | None:
    """MemTotal of this machine in GiB (None where unreadable)."""
    try:
        with open(path, encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 / 2**30
    except (OSError, ValueError, IndexError):
        return None
    return None


# ---- measurement -------------------------------------------------------------------------------

@dataclass(kw_only=True, frozen=True, slots=True)
class DeviceMeasurement:
    """One GPU of this node, measured: pinned copies and a bf16 matmul."""

    host: str
    gpu_name: str
    gpu_memory_gib: float
    d2h_gbps: float
    h2d_gbps: float
    duplex_gbps_each_way: float
    """Both directions at once (separate streams), per direction."""
    matmul_tflops: float
    """bf16 GEMM rate (large square matmuls): an upper bound of what a model achieves."""
    copy_bytes: int
    measured_at: float
    """time.time() of the measurement."""

    def to_hardware(self, *, model_efficiency: float = 0.6, gpus_per_node: int = 8,
                    host_memory_gib: float | None = None) -> Hardware:
        """Hardware from this measurement: achieved rate = GEMM rate x ``model_efficiency``
        (a transformer layer's forward + backward runs its GEMMs with attention, norms and
        communication around them); link = the duplex rate (offload and reload overlap). The
        measurement is of one GPU copying; with every GPU of the node copying at once the share
        may be lower: run the probe on all local ranks together to see it."""
        return Hardware(name=f"measured {self.gpu_name} on {self.host}",
                        gpu_memory_gib=self.gpu_memory_gib,
                        achieved_tflops=self.matmul_tflops * model_efficiency,
                        host_link_gbps=self.duplex_gbps_each_way,
                        host_link_alone_gbps=min(self.d2h_gbps, self.h2d_gbps),
                        host_memory_gib=host_memory_gib, gpus_per_node=gpus_per_node,
                        sources={"all": f"measured {time.ctime(self.measured_at)}"})


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "megatron-offload"


def _cache_file(directory: Path, host: str) -> Path:
    return directory / f"device-{re.sub(r'[^A-Za-z0-9_.-]', '_', host)}.json"


def measure_device(*, probe: Callable[[], dict], refresh: bool = False,
                   directory: str | Path | None = None,
                   host: str | None = None) -> DeviceMeasurement:
    """This node's GPU link and matmul rate, from the cache when present (one JSON file per
    node under ``~/.cache/megatron-offload``), else measured and cached.

    ``probe`` returns the measurement's fields but ``host`` and ``measured_at``
    (:func:`megatron_offload.runtime.link_probe.cuda_device_probe` on a GPU node: pinned D2H,
    H2D and both at once through the offload backend's streams, and a bf16 matmul; this
    module stays free of torch). ``refresh`` measures again."""
    directory = Path(directory) if directory is not None else cache_dir()
    host = host or socket.gethostname()
    path = _cache_file(directory, host)
    if not refresh and path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return DeviceMeasurement(**data)
        except (ValueError, TypeError):
            pass  # unreadable or from another version: measure again
    fields_ = probe()
    result = DeviceMeasurement(host=host, measured_at=time.time(), **fields_)
    directory.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(f".tmp{os.getpid()}")
    scratch.write_text(json.dumps(asdict(result), indent=2), encoding="utf-8")
    os.replace(scratch, path)  # atomic: concurrent ranks of one node never read half a file
    return result
