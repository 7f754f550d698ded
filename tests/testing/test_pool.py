"""WorkerPool: results in rank order, remote errors with traceback, dead workers, timeouts."""
import os
import signal
import time

import pytest

from megatron_offload.testing.pool import (
    PoolClosed,
    PoolTimeout,
    WorkerDied,
    WorkerError,
    WorkerPool,
)

T = "megatron_offload.testing.tasks:"


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie still answers kill(pid, 0); read its state
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] in "ZX"
    except FileNotFoundError:
        return True


@pytest.fixture(scope="module")
def light_pool():
    with WorkerPool(2, preload=()) as pool:
        yield pool


def test_run_returns_each_rank_value_in_order(light_pool):
    infos = light_pool.run(T + "rank_info")
    assert [i["rank"] for i in infos] == [0, 1]
    assert all(i["world_size"] == 2 for i in infos)
    assert [i["pid"] for i in infos] == light_pool.pids
    assert light_pool.run(T + "all_reduce_sum", value=1.5) == [4.5, 4.5]


def test_worker_exception_is_reraised_with_traceback_and_pool_survives(light_pool):
    with pytest.raises(WorkerError) as info:
        light_pool.run(T + "raise_on_rank", rank=1, message="deliberate failure")
    err = info.value
    assert err.rank == 1 and err.exc_type == "ValueError"
    assert "deliberate failure" in str(err)
    assert "_fail_deep" in err.remote_traceback and "tasks.py" in err.remote_traceback
    assert isinstance(err.__cause__, ValueError)
    # the same processes run the next task
    assert light_pool.run(T + "all_reduce_sum", value=1.0) == [3.0, 3.0]
    assert light_pool.alive()


def test_unpicklable_result_is_an_error_not_a_hang(light_pool):
    with pytest.raises(WorkerError):
        light_pool.run(T + "unpicklable_result")
    assert light_pool.run(T + "rank_info")[0]["rank"] == 0


def test_bad_target_is_reported(light_pool):
    with pytest.raises(WorkerError) as info:
        light_pool.run("megatron_offload.testing.tasks:no_such_function")
    assert info.value.exc_type == "AttributeError"


def test_killed_worker_is_detected_and_pool_torn_down():
    pool = WorkerPool(2, preload=())
    pids = list(pool.pids)
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(WorkerDied, match=r"rank 1"):
        pool.run(T + "all_reduce_sum", value=1.0, timeout=60)
    assert time.monotonic() - t0 < 10
    assert pool.closed
    assert all(_gone(p) for p in pids)
    with pytest.raises(PoolClosed):
        pool.run(T + "rank_info")


def test_worker_exiting_mid_task_is_detected():
    pool = WorkerPool(2, preload=())
    pids = list(pool.pids)
    with pytest.raises(WorkerDied, match=r"exit code 7"):
        pool.run(T + "exit_on_rank", rank=0, code=7, timeout=60)
    assert all(_gone(p) for p in pids)


def test_timeout_tears_the_pool_down():
    pool = WorkerPool(2, preload=())
    pids = list(pool.pids)
    with pytest.raises(PoolTimeout, match=r"rank\(s\) \[1\]"):
        pool.run(T + "sleep_on_rank", rank=1, seconds=60, timeout=1.0)
    assert pool.closed and all(_gone(p) for p in pids)


def test_close_stops_workers():
    with WorkerPool(1, preload=()) as pool:
        pids = list(pool.pids)
        assert pool.run(T + "rank_info")[0]["world_size"] == 1
    assert all(_gone(p) for p in pids)
