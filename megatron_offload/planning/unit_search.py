"""The search at unit granularity: schedule shapes x recompute levels x offload sets.

:class:`UnitSearch` scores candidates (simulated makespan, byte-weighted memory sweeps against
the GPU and host budgets) and finds the fastest that fits: baselines (no offload) level by
level of the recompute ladder, fastest first, and for a combination over budget the fewest
offload chunks K that make it fit (:func:`schedule.offload.plan_offload` with a memory target).
Layer streaming builds on it (:class:`megatron_offload.planning.granularity.LayerSearch`).
"""
from __future__ import annotations

import math

from megatron_offload.planning.candidates import (
    TOLERANCE,
    Candidate,
    Setting,
    better,
    build_setting,
)
from megatron_offload.planning.job import Recompute
from megatron_offload.schedule.catalog import make_schedule
from megatron_offload.schedule.ir import Schedule
from megatron_offload.schedule.memory import byte_peaks
from megatron_offload.schedule.offload import plan_offload
from megatron_offload.schedule.simulate import Simulation, simulate


class UnitSearch:
    """Candidates of one job on one kind of hardware, scored against ``budget_bytes`` (GPU, per
    rank) and ``host_budget_node`` (pinned host bytes per node); caches schedules, settings and
    the combinations without offload. :attr:`scored` lists every candidate scored."""

    def __init__(self, job, hardware, budget_bytes, host_budget_node, min_offload_bytes,
                 calibration):
        self.job, self.hardware = job, hardware
        self.budget, self.host_budget = budget_bytes, host_budget_node
        self.min_offload_bytes, self.calibration = min_offload_bytes, calibration
        self.schedules: dict[tuple[str, int | None], Schedule] = {}
        self.settings: dict[Recompute, Setting] = {}
        self.scored: list[Candidate] = []
        self.bases: dict[tuple, Candidate] = {}
        """(kind, group, recompute) -> the combination without offload, scored."""

    def setting(self, recompute: Recompute, level: int) -> Setting:
        if recompute not in self.settings:
            self.settings[recompute] = build_setting(self.job, self.hardware, recompute, level,
                                                     self.min_offload_bytes, self.calibration)
        return self.settings[recompute]

    def schedule(self, kind: str, group: int | None) -> Schedule:
        key = (kind, group)
        if key not in self.schedules:
            job = self.job
            self.schedules[key] = make_schedule(kind, job.pp, job.vpp, job.microbatches,
                                                group if kind != "1f1b" else None)
        return self.schedules[key]

    def score(self, kind, group, setting: Setting, sim: Simulation, chunks: int,
              offloaded) -> Candidate:
        totals = [[u.total for u in row] for row in setting.units]
        moved = [[u.offloadable for u in row] for row in setting.units]
        device, host = byte_peaks(sim, totals, moved)
        memory = [s.total + w + a for s, w, a in zip(setting.static, setting.working, device)]
        host_node = max(host) * self.hardware.gpus_per_node if host else 0.0
        candidate = Candidate(kind=kind, group_size=group, setting=setting, offload_chunks=chunks,
                              schedule=sim.schedule, simulation=sim, offloaded=offloaded,
                              activation_bytes=device, memory_bytes=memory, host_bytes=host,
                              host_bytes_per_node=host_node, gpu_fits=max(memory) <= self.budget,
                              host_fits=host_node <= self.host_budget)
        self.scored.append(candidate)
        return candidate

    def target_units(self, setting: Setting, baseline: Candidate) -> list[int]:
        """Per rank, the resident units that fit the budget: what is left after static and
        working memory, the rank's largest stage extra (embedding / loss tensors of its first or
        last chunk) and the small tensors offloaded units leave behind, over a middle unit's
        bytes."""
        unit = max(setting.typical.total, 1)
        targets = []
        for rank, (static, working) in enumerate(zip(setting.static, setting.working)):
            extra = max(0, max(u.total for u in setting.units[rank]) - setting.typical.total)
            kept = setting.typical.kept * baseline.simulation.peak_units[rank]
            targets.append(
                max(0, int((self.budget - static.total - working - extra - kept) // unit)))
        return targets

    def run(self, shapes, settings: list[Setting]) -> tuple[Candidate | None, list[tuple]]:
        """Level by level of the recompute ladder (each level's backward is longer, so a shape's
        makespan only grows from one level to the next: a shape whose makespan at a lower level
        already reaches the best plan's is not simulated again); within a level, combinations by
        makespan, stopping at the first slower than the best plan."""
        combos = []
        best: Candidate | None = None
        floor: dict[tuple, float] = {}  # shape -> makespan at the last level simulated
        for setting in settings:
            level = []
            for kind, group in shapes:
                if (best is not None
                        and floor.get((kind, group), 0.0) >= best.makespan * (1 - TOLERANCE)):
                    continue
                base = simulate(self.schedule(kind, group), setting.costs)
                floor[(kind, group)] = base.makespan
                level.append((base.makespan, 0 if kind != "gis" else 1, -(group or 0), kind, group,
                              setting, base))
            level.sort(key=lambda c: c[:3])
            combos += level
            for makespan, _, _, kind, group, setting, base in level:
                if best is not None and makespan > best.makespan * (1 + TOLERANCE):
                    break
                candidate = self.score(kind, group, setting, base, 0,
                                       [[] for _ in range(self.job.pp)])
                self.bases[(kind, group, setting.recompute)] = candidate
                if candidate.fits:
                    if better(candidate, best):
                        best = candidate
                    continue
                if (best is not None and math.isclose(makespan, best.makespan, rel_tol=TOLERANCE)
                        and best.offloaded_count == 0):
                    continue  # an equally fast plan without offload exists
                candidate = self._offload_search(kind, group, setting, candidate)
                if candidate is not None and better(candidate, best):
                    best = candidate
        return best, combos

    def base(self, kind, group, setting: Setting) -> Candidate:
        """The combination without offload, scored (cached)."""
        key = (kind, group, setting.recompute)
        if key not in self.bases:
            sim = simulate(self.schedule(kind, group), setting.costs)
            self.bases[key] = self.score(kind, group, setting, sim, 0,
                                         [[] for _ in range(self.job.pp)])
        return self.bases[key]

    def unit_at(self, kind, group, setting: Setting, chunks: int) -> Candidate:
        """The combination at unit granularity with every unit of chunks < ``chunks`` a
        candidate (no memory target): the unit-granularity numbers next to a layer score."""
        base = self.base(kind, group, setting)
        if chunks == 0:
            return base
        return self._pass(kind, group, setting, base, chunks, None)

    def _offload_search(self, kind, group, setting: Setting,
                        baseline: Candidate) -> Candidate | None:
        """The fitting candidate with the fewest offload chunks K for one combination, or None.

        First the most this combination can shed (every chunk a candidate, no memory target):
        if that does not fit, no K does. Then the smallest K whose pass, aiming at the budget
        in units, fits (binary search: a larger K only adds candidates)."""
        v = self.job.vpp
        target = self.target_units(setting, baseline)
        most = self._pass(kind, group, setting, baseline, v, None)
        if not most.gpu_fits:
            return None
        fitting = most if most.fits else None
        # invariant: K = high fits (with or without target), every K < low does not
        low, high = 1, v
        aimed: dict[int, Candidate] = {}
        while low <= high:
            chunks = (low + high) // 2
            candidate = aimed[chunks] = self._aimed(kind, group, setting, baseline, chunks, target)
            if candidate is not None and candidate.fits:
                fitting, high = candidate, chunks - 1
            else:
                low = chunks + 1
        return fitting

    def _aimed(self, kind, group, setting: Setting, baseline: Candidate, chunks: int,
               target: list[int]) -> Candidate | None:
        """Offload candidates of chunks < K only until each rank is down to ``target`` units; if
        the pass meets its target but the bytes (first / last stage extras) still exceed the
        budget, aim once more, lower by the excess."""
        candidate = self._pass(kind, group, setting, baseline, chunks, target)
        if (candidate.fits or any(p > t for p, t in zip(candidate.simulation.peak_units, target))
                or not candidate.host_fits):
            return candidate
        excess_units = math.ceil(candidate.excess(self.budget)
                                 / max(setting.typical.offloadable, 1))
        lower = self._pass(kind, group, setting, baseline, chunks,
                           [max(0, t - max(1, excess_units)) for t in target])
        if lower.fits or not lower.host_fits:
            return lower
        # every candidate of chunks < K
        return self._pass(kind, group, setting, baseline, chunks, None)

    def _pass(self, kind, group, setting: Setting, baseline: Candidate, chunks: int,
              target: list[int] | None) -> Candidate:
        base = baseline.simulation
        plan = plan_offload(base.schedule, setting.costs, chunks=chunks, memory_target=target,
                            baseline=base)
        sim = simulate(plan.schedule, setting.costs, no_offload_makespan=base.makespan)
        return self.score(kind, group, setting, sim, chunks, plan.offloaded)
