"""Small tasks for exercising ``WorkerPool`` (they must live in an importable module)."""
from __future__ import annotations

import os
import time


def rank_info() -> dict:
    """This worker's rank, world size and pid."""
    import torch.distributed as dist

    return {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "pid": os.getpid()}


def all_reduce_sum(value: float) -> float:
    """Sum of ``value * (rank + 1)`` over ranks: proves the process group works."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([value * (dist.get_rank() + 1)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def raise_on_rank(rank: int, message: str = "boom") -> str:
    """Raise ``ValueError(message)`` on ``rank``; the other ranks return ``"ok"``."""
    import torch.distributed as dist

    if dist.get_rank() == rank:
        _fail_deep(message)
    return "ok"


def _fail_deep(message: str) -> None:
    raise ValueError(message)


def exit_on_rank(rank: int, code: int = 7, delay_s: float = 0.0) -> str:
    """Kill the worker of ``rank`` abruptly (``os._exit``); the others return ``"ok"``."""
    import torch.distributed as dist

    if dist.get_rank() == rank:
        time.sleep(delay_s)
        os._exit(code)
    return "ok"


def sleep_on_rank(rank: int, seconds: float) -> str:
    """Sleep ``seconds`` on ``rank`` (to exercise timeouts); the others return at once."""
    import torch.distributed as dist

    if dist.get_rank() == rank:
        time.sleep(seconds)
    return "ok"


def unpicklable_result():
    """Returns something that cannot be pickled (a lambda)."""
    return lambda: None
