"""Remedies: when nothing fits, changes to the job (full recomputation where it was not
allowed, a smaller micro batch, more pipeline stages), each re-planned, and the cheapest that
fits (fewest extra GPUs, then iteration time for the same global batch).
"""
from __future__ import annotations

from collections.abc import Callable

from megatron_offload.planning.costmodel import GiB
from megatron_offload.planning.hardware import Hardware
from megatron_offload.planning.job import JobSpec, Recompute
from megatron_offload.planning.plan import Plan, Remedy


def remedy_jobs(job: JobSpec, allow_recompute: bool) -> list[tuple[str, dict, int, JobSpec]]:
    """Changed jobs to try: (description, flags, extra GPUs, job)."""
    out = []
    if not allow_recompute and job.recompute.granularity != "full":
        full = Recompute(granularity="full", method="uniform", num_layers=1)
        out.append(("full recompute: " + " ".join(full.megatron_flags()),
                    {"--recompute-granularity": "full"}, 0, job.with_changes(recompute=full)))
    gbs = job.global_batch_size or job.micro_batch_size * job.data_parallel_size
    mbs = job.micro_batch_size // 2
    while mbs >= 1:
        if gbs % (mbs * job.data_parallel_size) == 0:
            out.append((f"--micro-batch-size {mbs}", {"--micro-batch-size": mbs}, 0,
                        job.with_changes(micro_batch_size=mbs, global_batch_size=gbs)))
            break
        mbs //= 2
    for factor in (2, 4):
        p = job.pp * factor
        if p > job.num_layers:
            break
        v = next((v for v in range(job.vpp, 0, -1) if job.num_layers % (p * v) == 0), None)
        if v is None:
            continue
        dp, extra = job.data_parallel_size, 0
        if dp % factor == 0 and gbs % (job.micro_batch_size * dp // factor) == 0:
            dp //= factor
        else:
            extra = job.world_size * (factor - 1)
        flags = {"--pipeline-model-parallel-size": p}
        if v != job.vpp:
            flags["--num-virtual-stages-per-pipeline-rank"] = v
        where = "same GPUs, data-parallel size " + str(dp) if extra == 0 else f"{extra} more GPUs"
        change = (f"--pipeline-model-parallel-size {p}"
                  + (f" with {v} virtual stages per rank" if v != job.vpp else "")
                  + f" ({where})")
        try:
            changed = job.with_changes(pipeline_model_parallel_size=p, virtual_stages=v,
                                       data_parallel_size=dp, global_batch_size=gbs,
                                       microbatch_group_size_per_vp_stage=None)
        except ValueError:
            continue
        out.append((change, flags, extra, changed))
    return out


def find_remedy(job: JobSpec, hardware: Hardware, plan_job: Callable[..., Plan],
                **kwargs) -> tuple[Remedy | None, list[str]]:
    """The cheapest change of :func:`remedy_jobs` that fits, and what each change gave. Each
    changed job is planned with ``plan_job(changed, hardware, remedies=False, **kwargs)``: the
    planner (:func:`megatron_offload.planning.search.plan_job` passes itself)."""
    best: Remedy | None = None
    tried = []
    for change, flags, extra, changed in sorted(remedy_jobs(job, kwargs["allow_recompute"]),
                                                key=lambda item: item[2]):
        if best is not None and extra > best.extra_gpus:
            tried.append(f"{change}: not tried (needs more GPUs than a change that fits)")
            continue
        try:
            plan = plan_job(changed, hardware, remedies=False, **kwargs)
        except ValueError as error:
            tried.append(f"{change}: cannot plan ({error})")
            continue
        if not plan.fits:
            tried.append(f"{change}: still {plan.missing_bytes / GiB:.2f} GiB short on the "
                         "worst rank")
            continue
        # Cost: GPUs first, then time for the same global batch.
        tried.append(f"{change}: fits, {plan.iteration_time_s:.3f} s per iteration "
                     f"({plan.schedule_kind}, recompute {plan.recompute.label}, "
                     f"offload K={plan.offload_chunks})")
        remedy = Remedy(change=change, flags=flags, extra_gpus=extra, plan=plan)
        if best is None or ((extra, plan.iteration_time_s)
                            < (best.extra_gpus, best.plan.iteration_time_s)):
            best = remedy
    return best, tried
