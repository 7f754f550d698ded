"""Pool tasks for the executor tests: one model, many schedule variants, compared in-worker.

``run_variants(case, variants, iterations)`` runs in every rank of a pool: it builds the tiny
GPT of ``case`` once, keeps a copy of its initial weights, and for each variant restores them
and trains ``iterations`` iterations (plain SGD step on ``main_grad`` after each, as
``reference.run_case``). Variant 0 must be the reference (``offload=None``: unpatched
Megatron); every later variant is compared with it bitwise on this rank (loss bytes of the
last stage, every ``main_grad``, the parameters after the last step). Returns per variant the
mismatches (empty = identical), and with an offload config the runtime's last iteration stats
(executed ops, memory samples, unit bytes) and the per-iteration wall times.

Variants are dicts: ``{"offload": OffloadConfig | None, "microbatches": int | list | None,
"order": "gis" | "megatron"}`` (``microbatches`` overrides the case's count for that variant,
one value or one per iteration: a different m per call; ``order`` what the executor runs with
``schedule="gis"``, see ``integration.gis_schedule.settings``).
"""
from __future__ import annotations

import time

import torch


def _snapshot(chunks) -> list[torch.Tensor]:
    return [p.detach().clone() for chunk in chunks for p in chunk.parameters()]


@torch.no_grad()
def _restore(chunks, saved) -> None:
    for p, value in zip((p for chunk in chunks for p in chunk.parameters()), saved):
        p.copy_(value)


def _diff(where: str, a, b) -> list[str]:
    from megatron_offload.testing.reference import _tensor_diffs

    return _tensor_diffs(where, a, b)


def run_variants(case, variants: list[dict], iterations: int = 3) -> list[dict]:
    from dataclasses import replace

    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_offload.integration.gis_schedule import settings
    from megatron_offload.integration.megatron_core import install, uninstall
    from megatron_offload.testing.gpt import TinyGPTCase, build_model
    from megatron_offload.testing.reference import (
        _collect_grads,
        _collect_params,
        _one_iteration,
        _sgd_step,
        ensure_cpu_shims,
        init_parallel_state,
        release_parallel_state,
    )

    if isinstance(case, dict):
        case = TinyGPTCase(**case)
    ensure_cpu_shims()
    init_parallel_state(case)
    try:
        dp_rank = parallel_state.get_data_parallel_rank()
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        is_last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        chunks = build_model(case)
        initial = _snapshot(chunks)
        out = []
        reference = None
        for index, variant in enumerate(variants):
            _restore(chunks, initial)
            counts = variant.get("microbatches")
            if counts is None or isinstance(counts, int):
                counts = [counts] * iterations
            offload = variant.get("offload")
            settings.order = variant.get("order", "gis")
            runtime = install(offload) if offload is not None else None
            record = {"iterations": [], "stats": None, "step_s": []}
            try:
                for it in range(iterations):
                    run_case = (
                        case if counts[it] is None else replace(case, microbatches=counts[it])
                    )
                    fb = get_forward_backward_func()
                    t0 = time.perf_counter()
                    store = _one_iteration(run_case, chunks, fb, it, dp_rank, pp_rank, None)
                    record["step_s"].append(time.perf_counter() - t0)
                    loss = None
                    if is_last:
                        loss = torch.stack([d["lm loss"] for d in store]).numpy().tobytes()
                    record["iterations"].append(
                        {"loss": loss, "grads": _collect_grads(chunks, case)}
                    )
                    _sgd_step(chunks, case.lr)
                if runtime is not None:
                    stats = runtime.iteration_stats[-1].as_dict()
                    record["stats"] = {
                        k: stats[k]
                        for k in ("executed_ops", "samples", "unit_bytes", "peak_saved_bytes",
                                  "peak_resident_bytes", "offloaded_bytes", "reloaded_bytes")
                    }
            finally:
                settings.order = "gis"
                if runtime is not None:
                    uninstall()
            record["params"] = _collect_params(chunks, case)
            if index == 0:
                reference = record
                out.append({"mismatches": [], "stats": None, "step_s": record["step_s"],
                            "pp_rank": pp_rank})
                continue
            mismatches = []
            for it, (a, b) in enumerate(zip(reference["iterations"], record["iterations"])):
                if a["loss"] != b["loss"]:
                    mismatches.append(f"pp rank {pp_rank} iteration {it}: loss differs")
                mismatches += _diff(
                    f"pp rank {pp_rank} iteration {it}: grad", a["grads"], b["grads"]
                )
            mismatches += _diff(f"pp rank {pp_rank} after the last step: param",
                                reference["params"], record["params"])
            out.append({"mismatches": mismatches, "stats": record["stats"],
                        "step_s": record["step_s"], "pp_rank": pp_rank})
        return out
    except BaseException:
        release_parallel_state()
        raise


def measured_units(stats: dict) -> list[int]:
    """Resident units at each memory sample, from the runtime's measurement: walks the ops it
    issued (F adds a unit, O removes it, R adds it back, B removes it after its sample) and
    checks at each sample that the measured saved bytes (resident minus chunk outputs) are
    exactly the bytes of the units the walk holds. Raises AssertionError otherwise; returns
    the unit count at each sample (its max is the measured peak in units)."""
    resident: set[str] = set()
    samples = list(stats["samples"])
    counts = []
    cursor = 0
    for text in stats["executed_ops"]:
        chunk, letter, mb = _parse(text)
        unit = f"{chunk},{mb}"
        if letter == "F":
            resident.add(unit)
        elif letter == "O":
            resident.discard(unit)
        elif letter == "R":
            resident.add(unit)
        if letter in "FB":
            op, where, total, outputs = samples[cursor]
            assert op == text, (op, text)
            cursor += 1
            expected = sum(stats["unit_bytes"][u] for u in resident)
            saved = total - outputs
            assert saved == expected, (
                f"at {where} {op}: measured {saved} B, units {sorted(resident)} hold {expected} B"
            )
            counts.append(len(resident))
        if letter == "B":
            resident.discard(unit)
    return counts


def _parse(text: str) -> tuple[int, str, int]:
    for letter in "FBOR":
        if letter in text:
            chunk, mb = text.split(letter)
            return int(chunk), letter, int(mb)
    raise ValueError(text)



def peer_failure_worker(rank: int, port: int, report: str, mode: str,
                        timeout_s: float = 5.0) -> None:
    """One of two spawned ranks (not a pool worker: a pool tears down every rank when one
    dies). PP=2 gis run where pipeline rank 1, in its third forward, exits abruptly
    (``mode="die"``) or stops answering (``mode="hang"``); rank 0 writes the error it raised,
    and after how long, to ``report``."""
    import os
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    from megatron_offload.config import OffloadConfig
    from megatron_offload.integration.gis_schedule import settings
    from megatron_offload.integration.megatron_core import install
    from megatron_offload.testing import reference
    from megatron_offload.testing.gpt import TinyGPTCase, build_model

    case = TinyGPTCase(pp=2, microbatches=6, num_layers=2)
    reference.ensure_cpu_shims()
    reference.init_parallel_state(case)
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    chunks = build_model(case)
    settings.timeout_s = timeout_s
    install(OffloadConfig(schedule="gis", policy="full"))
    calls = [0]
    original = reference._ForwardStep.__call__

    def failing(self, data_iterator, model):
        calls[0] += 1
        if pp_rank == 1 and calls[0] == 3:
            if mode == "die":
                os._exit(9)
            time.sleep(3 * timeout_s)
        return original(self, data_iterator, model)

    reference._ForwardStep.__call__ = failing
    started = time.monotonic()
    try:
        reference._one_iteration(case, chunks, get_forward_backward_func(), 0, 0, pp_rank, None)
        outcome = "no error"
    except Exception as error:  # noqa: BLE001 - recorded for the test
        outcome = f"{type(error).__name__} after {time.monotonic() - started:.1f} s: {error}"
    if rank == 0:
        with open(report + ".tmp", "w") as handle:
            handle.write(outcome)
        os.replace(report + ".tmp", report)
    os._exit(0)  # skip process-group teardown with a dead or stuck peer
