"""The modes ``--pipeline-offload`` refuses: one table, :data:`REFUSED_MODES`, one row per mode.

A mode is refused when its steps bypass the patched ``forward_step``/``backward_step`` or run
them in an order the plugin does not predict (``kind="steps"``), when its own code owns the
saved-tensor hooks (``kind="hooks"``: only one mechanism can), or, for
``--offload-schedule gis`` only, when the executor cannot run it (``kind="gis"``). Each row
says what the mode is switched on by, why it is refused, the fix and the releases that have
it, and carries the words of each check that reads it:

- the launcher's pre-flight (:func:`launch_problem`, called by
  ``megatron_lm.check_offload_against_megatron``) reads Megatron-LM's parsed arguments
  (``args``) before any rank starts; its message is built from ``launch_why``;
- the patched schedules (:func:`refuse_unsupported`, before the first step of a training
  call) read the model's ``TransformerConfig`` (``fields``, or ``detect`` for a mode that
  depends on the release or on the schedule call's arguments) and list every ``problem``;
- the executor path (:func:`refuse_for_gis`) does the same for the ``gis`` rows;
- ``docs/compatibility.md`` (:mod:`.compatibility`) shows ``flags``, ``reason``, ``fix``
  and ``releases``.

A ``TransformerConfig`` field counts as on unless it is None, False or ``"none"`` (a field
that a release lacks reads as None); a Megatron-LM argument also counts as off at 0 or below
(``--cpu-offloading-num-layers 0``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from megatron_offload.config import ENABLE_FLAG
from megatron_offload.releases import RELEASES, SUPPORTED_MINORS, Release, release

GIS_FLAG = "--offload-schedule gis"


def _minors(fact: Callable[[Release], bool]) -> tuple[int, ...]:
    return tuple(minor for minor, facts in RELEASES.items() if fact(facts))


@dataclass(frozen=True, slots=True, kw_only=True)
class RefusedMode:
    """One refused mode (see the module docstring for who reads which field)."""

    key: str
    flags: tuple[str, ...]
    """What switches it on, as a user writes it (Megatron-LM flags, or a schedule argument)."""
    kind: str
    """``hooks``, ``steps`` or ``gis``."""
    reason: str
    fix: str
    releases: tuple[int, ...] = SUPPORTED_MINORS
    """The supported minors (0.<minor>.x) that have the mode."""
    fields: tuple[str, ...] = ()
    """``TransformerConfig`` fields that switch it on (any of them)."""
    detect: Callable | None = None
    """Instead of ``fields``: ``detect(config, facts, schedule_kwargs)`` returns the values for
    ``problem``'s placeholders (a dict) when the mode is on, None when it is off."""
    call_args: tuple[str, ...] = ()
    """Keyword arguments of the schedule call that ``detect`` reads (for the documents)."""
    problem: str = ""
    """The schedule check's words (joined after "--pipeline-offload cannot run with: ")."""
    args: tuple[str, ...] = ()
    """Megatron-LM argument names the launcher's pre-flight reads (flag: ``--`` + dashes)."""
    launch_why: str = ""
    """The launcher's words for why, in its message (see :meth:`launch_message`)."""

    def problem_for(self, config, facts: Release, schedule_kwargs=None) -> str | None:
        """This mode's problem text when ``config`` (and the schedule call) switch it on."""
        if self.detect is not None:
            found = self.detect(config, facts, schedule_kwargs)
        else:
            found = {} if any(_on(getattr(config, name, None)) for name in self.fields) else None
        return None if found is None else self.problem.format(**found)

    def launch_message(self, arg: str, value) -> str:
        """The launcher's error for Megatron-LM argument ``arg`` set to ``value``."""
        flag = "--" + arg.replace("_", "-")
        if self.kind == "hooks":
            return (f"{ENABLE_FLAG} cannot run with {flag} ({self.launch_why}): only one "
                    f"mechanism can own the saved-tensor hooks; drop {flag} or drop {ENABLE_FLAG}")
        if isinstance(value, str):  # a setting: name it and its off value
            return (f"{ENABLE_FLAG} cannot run with {flag} {value} ({self.launch_why}); "
                    f"use {flag} none")
        return f"{ENABLE_FLAG} cannot run with {flag} ({self.launch_why}); drop {flag}"


def _on(value) -> bool:
    """A ``TransformerConfig`` field that is switched on."""
    return value is not None and value is not False and value != "none"


def _arg_on(value) -> bool:
    """A Megatron-LM argument that is switched on (counts: above 0)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value > 0
    return bool(value) and value != "none"


# ----------------------------------------------------------------- modes that need a detector
def _whole_iteration_graph(config, facts: Release, schedule_kwargs=None) -> dict | None:
    graph_impl = getattr(config, "cuda_graph_impl", "none")
    scope = getattr(config, "cuda_graph_scope", None)
    scopes = scope if isinstance(scope, (list, tuple)) else [scope]
    on = graph_impl == "full_iteration" or (
        facts.full_iteration_graph_field == "cuda_graph_scope"
        and graph_impl == "local"
        and any(getattr(s, "name", s) == "full_iteration" for s in scopes)
    )
    if not on:
        return None
    if facts.full_iteration_graph_field == "cuda_graph_impl":
        return {"flag": "--cuda-graph-impl full_iteration"}
    return {"flag": "--cuda-graph-scope full_iteration"}


def _cuda_graphs(config, facts: Release, schedule_kwargs=None) -> dict | None:
    if _whole_iteration_graph(config, facts) is not None:
        return None  # refused as a whole-iteration graph
    names = ("enable_cuda_graph", "external_cuda_graph", "cuda_graph_impl")
    return {} if any(_on(getattr(config, name, None)) for name in names) else None


def _multimodule_pipeline(config, facts: Release, schedule_kwargs=None) -> dict | None:
    """The schedule argument that makes the call a multi-module pipeline."""
    if not schedule_kwargs:  # a config alone (no schedule call) is never one
        return None
    communicator = schedule_kwargs.get("p2p_communicator")
    collection = schedule_kwargs.get("pg_collection")
    if facts.multimodule_pipelines:
        from megatron.core.pipeline_parallel.multimodule_communicator import (
            MultiModulePipelineCommunicator,
        )
        from megatron.core.process_groups_config import MultiModuleProcessGroupCollection

        if isinstance(collection, MultiModuleProcessGroupCollection):
            return {"argument": "pg_collection=MultiModuleProcessGroupCollection"}
        if isinstance(communicator, MultiModulePipelineCommunicator):
            return {"argument": "p2p_communicator=MultiModulePipelineCommunicator"}
    if communicator is not None and not hasattr(communicator, "pp_group"):
        return {"argument": f"p2p_communicator={type(communicator).__name__} without a pp_group"}
    return None


def _adjusted_tensor_shapes(config, facts: Release, schedule_kwargs=None) -> dict | None:
    return {} if (schedule_kwargs or {}).get("adjust_tensor_shapes_fn") is not None else None


# ----------------------------------------------------------------------------- the table
_CAPTURED = "a captured CUDA graph cannot release and refill activation memory"
_ONE_OWNER = "only one mechanism can own the saved-tensor hooks"
_USE_MEGATRON = "use --offload-schedule megatron"
_NOT_IN_EXECUTOR = "the executor (runtime/executor.py) does not implement it"

REFUSED_MODES: tuple[RefusedMode, ...] = (
    RefusedMode(
        key="a2a_overlap", kind="steps", flags=("--overlap-moe-expert-parallel-comm",),
        reason="MoE A2A-overlap combined 1F1B runs its own forward/backward, never the patched "
               "steps, so nothing is offloadable",
        fix="drop --overlap-moe-expert-parallel-comm",
        fields=("overlap_moe_expert_parallel_comm",),
        problem="--overlap-moe-expert-parallel-comm (MoE A2A-overlap combined 1F1B runs its own "
                "forward/backward and is not offloadable): drop the flag",
        args=("overlap_moe_expert_parallel_comm",),
        launch_why="MoE A2A-overlap combined 1F1B runs its own forward/backward, never the "
                   "patched steps",
    ),
    RefusedMode(
        key="hybrid_context_parallel", kind="steps", flags=("--hybrid-context-parallel",),
        reason="its schedule runs forward_step/backward_step per packed sub-sample group, in an "
               "order and count the plugin does not predict",
        fix="drop --hybrid-context-parallel",
        fields=("hybrid_context_parallel",),
        problem="--hybrid-context-parallel (its schedule runs forward_step/backward_step per "
                "packed sub-sample group, in an order and count the plugin does not predict): "
                "drop the flag",
        args=("hybrid_context_parallel",),
        launch_why="hybrid context parallel runs the steps in an order per sample group that "
                   "is not predicted",
    ),
    RefusedMode(
        key="whole_iteration_cuda_graph", kind="steps",
        flags=("--cuda-graph-scope full_iteration", "--cuda-graph-impl full_iteration"),
        reason="a whole-iteration CUDA graph replays the schedule without running "
               "forward_step/backward_step, and " + _CAPTURED + " (0.16 and 0.17 build one for "
               "--cuda-graph-scope full_iteration with --cuda-graph-impl local, 0.18+ for "
               "--cuda-graph-impl full_iteration: Release.full_iteration_graph_field)",
        fix="--cuda-graph-impl none",
        fields=("cuda_graph_impl", "cuda_graph_scope"),
        detect=_whole_iteration_graph,
        problem="{flag} (a whole-iteration CUDA graph replays the schedule without running "
                "forward_step/backward_step, and a captured graph cannot release and refill "
                "activation memory): drop the flag (--cuda-graph-impl none)",
    ),
    RefusedMode(
        key="cuda_graphs", kind="steps",
        flags=("--cuda-graph-impl local", "--cuda-graph-impl transformer_engine",
               "--enable-cuda-graph", "--external-cuda-graph"),
        reason=_CAPTURED,
        fix="--cuda-graph-impl none; drop --enable-cuda-graph / --external-cuda-graph",
        fields=("enable_cuda_graph", "external_cuda_graph", "cuda_graph_impl"),
        detect=_cuda_graphs,
        problem="CUDA graphs (--cuda-graph-impl / --enable-cuda-graph / --external-cuda-graph): "
                "a captured graph cannot release and refill activation memory; drop the flag",
        args=("enable_cuda_graph", "external_cuda_graph", "cuda_graph_impl"),
        launch_why=_CAPTURED,
    ),
    RefusedMode(
        key="cpu_offloading", kind="hooks",
        flags=("--cpu-offloading-num-layers N", "--cpu-offloading"),
        reason="Megatron's layer-wise activation offloading: " + _ONE_OWNER + " (Megatron-LM "
               "sets cpu_offloading for --cpu-offloading-num-layers N > 0; --cpu-offloading "
               "is a fork's flag)",
        fix="drop --cpu-offloading-num-layers / --cpu-offloading, or drop " + ENABLE_FLAG,
        fields=("cpu_offloading",),
        problem="--cpu-offloading (Megatron's layer-wise offload): only one offloading "
                "mechanism can own the saved-tensor hooks; drop --cpu-offloading",
        args=("cpu_offloading", "cpu_offloading_num_layers"),
        launch_why="Megatron's layer-wise activation offloading",
    ),
    RefusedMode(
        key="fine_grained_activation_offloading", kind="hooks",
        flags=("--fine-grained-activation-offloading",),
        reason="Megatron's fine-grained activation offloading: " + _ONE_OWNER,
        fix="drop --fine-grained-activation-offloading, or drop " + ENABLE_FLAG,
        fields=("fine_grained_activation_offloading",),
        problem="--fine-grained-activation-offloading: only one offloading mechanism can own "
                "the saved-tensor hooks; drop --fine-grained-activation-offloading",
        args=("fine_grained_activation_offloading",),
        launch_why="Megatron's fine-grained activation offloading",
    ),
    RefusedMode(
        key="moe_paged_stash", kind="hooks", flags=("--moe-paged-stash",),
        reason="Megatron's MoE paged stash installs its own saved-tensor hooks for the expert "
               "activations: " + _ONE_OWNER,
        fix="drop --moe-paged-stash, or drop " + ENABLE_FLAG,
        releases=_minors(lambda facts: facts.moe_paged_stash),
        fields=("moe_paged_stash",),
        problem="--moe-paged-stash (Megatron's MoE paged stash installs its own saved-tensor "
                "hooks for the expert activations; only one mechanism can own them): drop "
                "--moe-paged-stash",
        args=("moe_paged_stash",),
        launch_why="MoE paged stash, which installs its own saved-tensor hooks",
    ),
    RefusedMode(
        key="moe_expert_rank_capacity_factor", kind="steps",
        flags=("--moe-expert-rank-capacity-factor",),
        reason="Megatron-LM then wraps the schedule in PagedStashRunner, which reads every "
               "microbatch ahead and reruns the whole forward-backward after a token overflow, "
               "outside the order the plugin predicts",
        fix="drop --moe-expert-rank-capacity-factor",
        releases=_minors(lambda facts: facts.moe_paged_stash),
        fields=("moe_expert_rank_capacity_factor",),
        problem="--moe-expert-rank-capacity-factor (Megatron-LM then wraps the schedule in "
                "PagedStashRunner, which reads every microbatch ahead and reruns the whole "
                "forward-backward after a token overflow, outside the order the plugin "
                "predicts): drop the flag",
    ),
    RefusedMode(
        key="multimodule_pipeline", kind="steps",
        flags=("pg_collection=MultiModuleProcessGroupCollection",
               "p2p_communicator=MultiModulePipelineCommunicator",
               "p2p_communicator without a pp_group"),
        reason="a multi-module pipeline (e.g. a MIMO model with separate encoder and "
               "language-model grids; 0.17+: Release.multimodule_pipelines) runs its backward "
               "through backward_step_multimodule, which the plugin does not patch; a "
               "p2p_communicator without a pp_group is taken for one, on any release",
        fix="run it without " + ENABLE_FLAG,
        detect=_multimodule_pipeline,
        call_args=("pg_collection", "p2p_communicator"),
        problem="a multi-module pipeline ({argument} passed to the schedule, e.g. a MIMO model "
                "with separate encoder and language-model grids: its backward runs "
                "backward_step_multimodule, which the plugin does not patch): run it without "
                "--pipeline-offload",
    ),
    RefusedMode(
        key="gis_variable_seq_lengths", kind="gis",
        flags=("TransformerConfig.variable_seq_lengths",),
        reason="the executor sends fixed [seq, micro-batch, hidden] tensors (the field is set "
               "by the data path, not by a flag)",
        fix=_USE_MEGATRON,
        fields=("variable_seq_lengths",),
        problem="variable_seq_lengths (the executor sends fixed [seq, micro-batch, hidden] "
                "tensors): " + _USE_MEGATRON,
    ),
    RefusedMode(
        key="gis_partial_activation_checkpoints", kind="gis",
        flags=("TransformerConfig.num_microbatches_with_partial_activation_checkpoints",),
        reason=_NOT_IN_EXECUTOR,
        fix=_USE_MEGATRON,
        fields=("num_microbatches_with_partial_activation_checkpoints",),
        problem="--num-microbatches-with-partial-activation-checkpoints: " + _USE_MEGATRON,
    ),
    RefusedMode(
        key="gis_defer_embedding_wgrad", kind="gis", flags=("--defer-embedding-wgrad-compute",),
        reason=_NOT_IN_EXECUTOR,
        fix=_USE_MEGATRON,
        fields=("defer_embedding_wgrad_compute",),
        problem="--defer-embedding-wgrad-compute: " + _USE_MEGATRON,
    ),
    RefusedMode(
        key="gis_adjust_tensor_shapes", kind="gis",
        flags=("adjust_tensor_shapes_fn",),
        reason="the executor sends fixed [seq, micro-batch, hidden] tensors",
        fix=_USE_MEGATRON,
        detect=_adjusted_tensor_shapes,
        call_args=("adjust_tensor_shapes_fn",),
        problem="adjust_tensor_shapes_fn: " + _USE_MEGATRON,
    ),
)
"""Every refused mode. The order is the order of the schedule checks' problem lists."""

MODES = {mode.key: mode for mode in REFUSED_MODES}


def _check_table() -> None:
    """One row per key and per Megatron-LM argument; every row reachable (checked at import)."""
    args = [arg for mode in REFUSED_MODES for arg in mode.args]
    if len(MODES) != len(REFUSED_MODES) or len(set(args)) != len(args):  # pragma: no cover
        raise AssertionError("refusals: a mode key or a Megatron-LM argument appears twice")
    for mode in REFUSED_MODES:
        if mode.kind not in ("hooks", "steps", "gis") or not (mode.fields or mode.detect):
            raise AssertionError(  # pragma: no cover
                f"refusals: row {mode.key} has no kind or no check")
        if mode.args and not mode.launch_why:  # pragma: no cover
            raise AssertionError(f"refusals: row {mode.key} reads arguments but has no words")


_check_table()


# ----------------------------------------------------------------------------- the checks
def problems(config, facts: Release, *, schedule_kwargs=None,
             kinds=("steps", "hooks")) -> list[str]:
    """The problem text of every mode of ``kinds`` that ``config`` / the call switch on."""
    found = (mode.problem_for(config, facts, schedule_kwargs)
             for mode in REFUSED_MODES if mode.kind in kinds)
    return [text for text in found if text is not None]


def refuse_unsupported(config, facts: Release | None = None, *, schedule_kwargs=None) -> None:
    """Raise ValueError, naming each flag and its fix, for every mode whose steps bypass
    ``forward_step``/``backward_step``, run them in an order the plugin does not predict, or
    whose own code owns the saved-tensor hooks.

    ``config`` is the model's ``TransformerConfig`` (read with ``getattr``: fields that a
    release lacks count as off); ``facts`` the release (default: the installed one);
    ``schedule_kwargs`` the keyword arguments the schedule function was called with (for the
    multi-module pipelines of 0.17+). The patched schedules call this before their first step.
    """
    facts = release() if facts is None else facts
    found = problems(config, facts, schedule_kwargs=schedule_kwargs)
    if found:
        raise ValueError(f"{ENABLE_FLAG} cannot run with: " + "; ".join(found))


def refuse_for_gis(config, facts: Release, schedule_kwargs) -> None:
    """Raise ValueError for what the executor of ``--offload-schedule gis`` cannot run."""
    found = problems(config, facts, schedule_kwargs=schedule_kwargs, kinds=("gis",))
    if found:
        raise ValueError(f"{GIS_FLAG} cannot run with: " + "; ".join(found))


def launch_problem(args) -> str | None:
    """The launcher's error for the first refused mode that Megatron-LM's parsed ``args``
    switch on (another owner of the saved-tensor hooks first), or None."""
    for kind in ("hooks", "steps"):
        for mode in REFUSED_MODES:
            if mode.kind != kind:
                continue
            for arg in mode.args:
                value = getattr(args, arg, None)
                if _arg_on(value):
                    return mode.launch_message(arg, value)
    return None


__all__ = ["RefusedMode", "REFUSED_MODES", "MODES", "refuse_unsupported", "refuse_for_gis",
           "launch_problem", "problems"]
