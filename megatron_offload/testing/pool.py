"""A gloo multi-process harness that keeps its processes (and process group) across tasks.

Starting a process and importing megatron-core costs seconds; a tiny pipeline case costs
well under one. ``WorkerPool(world_size)`` spawns ``world_size`` processes once, each joins
one gloo process group, and then runs tasks from its queue::

    with WorkerPool(2) as pool:
        per_rank = pool.run("megatron_offload.testing.reference:run_case", case=case)

A task is ``"package.module:function"`` (it must live in an importable module, not in a
test file) called as ``function(**kwargs)`` on every rank; ``run`` returns the list of the
ranks' return values (picklable). A task that raises on any rank is re-raised in the caller
as ``WorkerError`` carrying the remote traceback; the pool stays usable when every rank
came back. When a rank dies, or a call passes its timeout (ranks are then stuck in a
collective and cannot be recovered), the pool terminates every worker and raises
``WorkerDied`` / ``PoolTimeout``; it is closed afterwards. Workers also exit on their own
when their parent process disappears, so no process is orphaned.
"""
from __future__ import annotations

import atexit
import importlib
import os
import pickle
import queue as queue_mod
import socket
import threading
import time
import traceback
from datetime import timedelta
from typing import Any

import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 300.0
"""Per-call limit of ``WorkerPool.run`` when the call gives none."""

START_TIMEOUT_S = 180.0
"""How long ``WorkerPool`` waits for every worker to import, join gloo and report ready."""

DEFAULT_PRELOAD: tuple[str, ...] = (
    "megatron.core.pipeline_parallel",
    "megatron.core.models.gpt",
    "megatron.core.distributed",
    "megatron_offload.testing.reference",
)
"""Modules every worker imports before it reports ready (megatron-core costs ~3 s a process)."""

ERROR_GRACE_S = 20.0
"""After one rank failed, how long to wait for the others before declaring the pool stuck."""


class PoolError(RuntimeError):
    """Base of the pool's errors."""


class WorkerError(PoolError):
    """A task raised on a worker. ``rank``, ``exc_type``, ``remote_traceback``; the
    original exception is chained as ``__cause__`` when it could be pickled."""

    def __init__(self, message: str, *, rank: int, exc_type: str, remote_traceback: str,
                 errors: dict[int, str] | None = None):
        super().__init__(message)
        self.rank = rank
        self.exc_type = exc_type
        self.remote_traceback = remote_traceback
        self.errors = errors or {}


class WorkerDied(PoolError):
    """A worker process exited while the pool was running; the pool has been torn down."""


class PoolTimeout(PoolError, TimeoutError):
    """A call ran past its timeout; the pool has been torn down."""


class PoolClosed(PoolError):
    """``run`` on a pool that was closed (or torn down after a failure)."""


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_target(target: str):
    module_name, sep, func_name = target.partition(":")
    if not sep or not module_name or not func_name:
        raise ValueError(f"task target {target!r} must look like 'package.module:function'")
    obj = importlib.import_module(module_name)
    for part in func_name.split("."):
        obj = getattr(obj, part)
    return obj


# --- worker side --------------------------------------------------------------------------

def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(3)
        time.sleep(0.5)


def _worker_main(rank: int, world_size: int, port: int, tasks, results, parent_pid: int,
                 threads: int, preload: tuple[str, ...], pg_timeout_s: float) -> None:
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    try:
        import torch
        import torch.distributed as dist

        if threads > 0:
            torch.set_num_threads(threads)
        for name in preload:
            importlib.import_module(name)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=pg_timeout_s),
        )
    except BaseException as exc:  # report and leave; the parent tears the pool down
        results.put((0, rank, "start-failed", None, _format_exc(exc)))
        return
    results.put((0, rank, "ready", os.getpid(), None))
    while True:
        item = tasks.get()
        if item is None:
            break
        call_id, target, kwargs = item
        try:
            value = resolve_target(target)(**kwargs)
            payload = pickle.dumps(value)
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the caller
            try:
                exc_bytes = pickle.dumps(exc)
                pickle.loads(exc_bytes)
            except Exception:  # noqa: BLE001
                exc_bytes = None
            results.put((call_id, rank, "error", (type(exc).__qualname__, exc_bytes),
                         _format_exc(exc)))
            del exc
            continue
        results.put((call_id, rank, "ok", payload, None))
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


def _format_exc(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


# --- parent side --------------------------------------------------------------------------

class WorkerPool:
    """``world_size`` spawned processes in one gloo process group, reused across tasks.

    Arguments: ``threads`` torch intra-op threads per worker (1 keeps runs on different
    layouts bitwise comparable and avoids oversubscribing small machines; 0 leaves torch's
    default); ``preload`` modules imported by every worker before it reports ready;
    ``start_timeout`` seconds for all workers to come up; ``pg_timeout`` the gloo timeout.
    """

    def __init__(self, world_size: int, *, threads: int = 1,
                 preload: tuple[str, ...] = DEFAULT_PRELOAD,
                 start_timeout: float = START_TIMEOUT_S, pg_timeout: float = 600.0):
        if world_size < 1:
            raise ValueError(f"world_size={world_size} must be >= 1")
        self.world_size = world_size
        self._ctx = mp.get_context("spawn")
        self._closed = False
        self._call_id = 0
        self.port = free_tcp_port()
        self._tasks = [self._ctx.Queue() for _ in range(world_size)]
        self._results = self._ctx.Queue()
        self._procs = []
        t0 = time.perf_counter()
        for rank in range(world_size):
            proc = self._ctx.Process(
                target=_worker_main, name=f"megatron-offload-worker-{rank}",
                args=(rank, world_size, self.port, self._tasks[rank], self._results,
                      os.getpid(), threads, tuple(preload), pg_timeout),
                daemon=True,
            )
            proc.start()
            self._procs.append(proc)
        self.pids = [None] * world_size
        try:
            self._wait_ready(start_timeout)
        except BaseException:
            self._teardown()
            raise
        self.start_seconds = time.perf_counter() - t0

    # -- lifecycle

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        ready: set[int] = set()
        while len(ready) < self.world_size:
            msg = self._get(deadline, what="start")
            call_id, rank, kind, payload, tb = msg
            if kind == "start-failed":
                raise WorkerError(f"worker rank {rank} failed to start:\n{tb}", rank=rank,
                                  exc_type="start-failed", remote_traceback=tb)
            if kind == "ready":
                ready.add(rank)
                self.pids[rank] = payload

    def _get(self, deadline: float, *, what: str):
        """Next message from the workers; raises WorkerDied / PoolTimeout."""
        while True:
            try:
                return self._results.get(timeout=0.05)
            except queue_mod.Empty:
                pass
            dead = [(r, p.exitcode) for r, p in enumerate(self._procs) if not p.is_alive()]
            if dead:
                # a message sent just before dying may still be in the pipe
                try:
                    return self._results.get(timeout=0.2)
                except queue_mod.Empty:
                    pass
                raise WorkerDied(
                    f"worker(s) died during {what}: "
                    + ", ".join(f"rank {r} (pid {self.pids[r]}, exit code {c})" for r, c in dead)
                    + "; the pool has been torn down"
                )
            if time.monotonic() > deadline:
                raise PoolTimeout(f"{what} did not finish in time; the pool has been torn down")

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers (politely, then by force). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for q in self._tasks:
            try:
                q.put(None)
            except Exception:  # noqa: BLE001
                pass
        deadline = time.monotonic() + timeout
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
        self._teardown()

    def _teardown(self) -> None:
        self._closed = True
        for p in self._procs:
            if p.is_alive():
                p.terminate()
        for p in self._procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        for q in [*self._tasks, self._results]:
            q.cancel_join_thread()
            q.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def alive(self) -> bool:
        return not self._closed and all(p.is_alive() for p in self._procs)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # last resort; close() is the way
        try:
            if not self._closed:
                self._teardown()
        except Exception:  # noqa: BLE001
            pass

    # -- tasks

    def run(self, target: str, /, *, timeout: float | None = None, **kwargs: Any) -> list:
        """Run ``target(**kwargs)`` on every rank; return the ranks' values, rank order.

        ``timeout`` (seconds, default ``DEFAULT_TIMEOUT_S``) bounds the whole call; the name
        is therefore reserved and never passed to the target.
        """
        if self._closed:
            raise PoolClosed("this WorkerPool is closed; start a new one")
        self._call_id += 1
        call_id = self._call_id
        deadline = time.monotonic() + (DEFAULT_TIMEOUT_S if timeout is None else timeout)
        for q in self._tasks:
            q.put((call_id, target, kwargs))
        values: dict[int, Any] = {}
        errors: dict[int, tuple] = {}
        try:
            while len(values) + len(errors) < self.world_size:
                wait_until = deadline
                if errors:
                    wait_until = min(deadline, first_error_at + ERROR_GRACE_S)
                try:
                    msg_id, rank, kind, payload, tb = self._get(wait_until, what=f"{target}")
                except PoolTimeout as exc:
                    if errors:
                        raise self._worker_error(target, errors, stuck=True) from exc
                    missing = sorted(set(range(self.world_size)) - set(values))
                    raise PoolTimeout(
                        f"{target} did not finish on rank(s) {missing} within "
                        f"{DEFAULT_TIMEOUT_S if timeout is None else timeout} s; "
                        "the pool has been torn down"
                    ) from None
                if msg_id != call_id:
                    continue  # stale message of an earlier, abandoned call
                if kind == "ok":
                    values[rank] = pickle.loads(payload)
                else:
                    if not errors:
                        first_error_at = time.monotonic()
                    errors[rank] = (payload, tb)
        except BaseException:
            self._teardown()
            raise
        if errors:
            raise self._worker_error(target, errors, stuck=False)
        return [values[r] for r in range(self.world_size)]

    def _worker_error(self, target: str, errors: dict[int, tuple], *, stuck: bool) -> WorkerError:
        rank = min(errors)
        (exc_type, exc_bytes), tb = errors[rank]
        others = sorted(set(errors) - {rank})
        note = ""
        if others:
            note += f" (rank(s) {others} failed too)"
        if stuck:
            self._teardown()
            note += ("; the other ranks did not return (likely waiting on the failed one), "
                     "so the pool has been torn down")
        err = WorkerError(
            f"{target} raised {exc_type} on rank {rank}{note}\n--- remote traceback (rank "
            f"{rank}) ---\n{tb}",
            rank=rank, exc_type=exc_type, remote_traceback=tb,
            errors={r: t for r, (_, t) in errors.items()},
        )
        if exc_bytes is not None:
            try:
                err.__cause__ = pickle.loads(exc_bytes)
            except Exception:  # noqa: BLE001
                pass
        return err


# --- session pools ------------------------------------------------------------------------

_SESSION_POOLS: dict[int, WorkerPool] = {}


def session_pool(world_size: int, **kwargs: Any) -> WorkerPool:
    """A shared pool per world size for this process, started on first use.

    A pool that was torn down (dead worker, timeout) is replaced by a fresh one on the next
    call. All are closed at interpreter exit, or by ``close_session_pools()``. Wrap it in a
    session-scoped pytest fixture::

        @pytest.fixture(scope="session")
        def pool2():
            return session_pool(2)
    """
    pool = _SESSION_POOLS.get(world_size)
    if pool is None or not pool.alive():
        if pool is not None:
            pool.close()
        pool = WorkerPool(world_size, **kwargs)
        _SESSION_POOLS[world_size] = pool
    return pool


def close_session_pools() -> None:
    while _SESSION_POOLS:
        _, pool = _SESSION_POOLS.popitem()
        pool.close()


atexit.register(close_session_pools)


__all__ = [
    "WorkerPool", "session_pool", "close_session_pools", "WorkerError", "WorkerDied",
    "PoolTimeout", "PoolClosed", "PoolError", "free_tcp_port", "resolve_target",
    "DEFAULT_TIMEOUT_S",
]
