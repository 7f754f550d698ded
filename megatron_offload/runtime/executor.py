"""Runs one pipeline rank's row of a schedule IR on Megatron-Core's own steps.

``run_rank`` walks the rank's op list (``schedule/ir.py``) in order and runs each compute op
with the handler of its kind (``_RankRun.HANDLERS``, one method per kind; a kind without one is
an error naming it, raised before anything runs):

- ``F``: waits for the input activation (if any), runs megatron-core's ``forward_step`` on
  the model chunk (through the offload runtime's hooks when one is given), posts the
  non-blocking send of the output;
- ``B``: waits for the output gradient (if any), runs megatron-core's ``backward_step``,
  posts the non-blocking send of the input gradient;
- ``O`` / ``R`` (copies, not in the p2p plan's compute rows): the unit's offload / reload,
  exactly there: the offload runtime follows the same row as its runtime list
  (``ActivationOffloader.begin_iteration(plan=row)``) and issues each copy at its entry; the
  backward waits only for its own unit's copy.

What a kind receives and sends, and which kind does a chunk's gradient sync, come from its row
of the kinds table (``schedule/kinds.py``).

Communication follows :mod:`schedule.p2p`: each pair of ranks posts the messages it exchanges
in one order, computed by both from the same schedule, one ``isend`` / ``irecv`` per message
(never batched). Receives are posted ``lookahead`` compute ops before they are consumed (or
earlier where the pair order requires it), sends as soon as their op ends; a rank waits for a
receive right before the op that consumes it, and for a send only before the storage it reads
is released (``deallocate_pipeline_outputs``, the backward of that unit, the end of the call).
On CPU (gloo) every wait has a timeout: a dead or stuck peer raises :class:`PeerTimeoutError`
naming the ranks and the message instead of hanging; on GPUs (NCCL) the process group's
watchdog timeout does that job (a host-side timed wait would serialize the host with the
device).

What Megatron's schedule functions do around the steps and the executor repeats: data-parallel
grad sync disabled (``config.no_sync_func``) except for the backward of each chunk's last
microbatch (or ``config.grad_sync_func`` right after it), the remaining grad syncs at the
end, ``config.param_sync_func`` for every chunk at the start, the token count and
``config.finalize_model_grads_func`` at the end; forward-only calls run forwards only, with
neither grad nor param sync. Gradients accumulate per chunk in microbatch order, as in every
Megatron schedule, so the result is bitwise that of Megatron's functions.

Pure mechanism: which schedule, which units move and where the copies go are decided by the
caller (``integration/gis_schedule.py``); only arguments of ``forward_step`` /
``backward_step`` are bound by name (``releases.call_by_name``).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from megatron_offload.schedule.ir import Schedule
from megatron_offload.schedule.kinds import Flow, OpKind
from megatron_offload.schedule.p2p import P2PPlan, RankPlan

DEFAULT_TIMEOUT_S = 300.0


class PeerTimeoutError(RuntimeError):
    """A point-to-point message did not complete in time: the peer died or hangs."""


@dataclass(slots=True)
class _Posted:
    work: Any
    tensor: torch.Tensor


class _Channels:
    """This rank's posts on every pair, in the plan's order (see :mod:`schedule.p2p`)."""

    def __init__(self, plan: RankPlan, group, *, shape, dtype, device, timeout_s: float,
                 lookahead: int, label: str) -> None:
        self.plan, self.group = plan, group
        self.shape, self.dtype, self.device = shape, dtype, device
        self.timeout = timedelta(seconds=timeout_s)
        self.timeout_s = timeout_s
        self.lookahead, self.label = lookahead, label
        self.cursor = {peer: 0 for peer in plan.queues}
        self.outputs: dict[int, torch.Tensor] = {}
        self.recvs: dict[tuple, _Posted] = {}
        self.sends: dict[int, _Posted] = {}  # by producing step
        # where each of this rank's sends (by producing step) and receives (by message) sits
        # in its pair's queue
        self.send_index = {post.step: i for posts in plan.queues.values()
                           for i, post in enumerate(posts) if post.send}
        self.recv_index = {post.message: i for posts in plan.queues.values()
                           for i, post in enumerate(posts) if not post.send}

    # ----------------------------------------------------------------------- posting
    def _post(self, peer: int, *, upto: int | None = None, window: int | None = None) -> None:
        """Post this pair's items in order: all up to index ``upto`` (forced), then receives
        consumed by step <= ``window`` and sends already produced."""
        queue = self.plan.queues[peer]
        i = self.cursor[peer]
        while i < len(queue):
            post = queue[i]
            forced = upto is not None and i <= upto
            if post.send:
                tensor = self.outputs.get(post.step)
                if tensor is None:
                    if forced:
                        raise RuntimeError(
                            f"{self.label}p2p plan inconsistent: the send of {post.message} to pp "
                            f"rank {peer} (compute step {post.step}) precedes a message needed now"
                        )
                    break
                work = dist.isend(tensor, group=self.group, group_dst=peer)
                self.sends[post.step] = _Posted(work, tensor)
                del self.outputs[post.step]
            else:
                if not forced and (window is None or post.step > window):
                    break
                # activations (a downstream message) are differentiated through by their consumer
                buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device,
                                     requires_grad=OpKind(post.message[0]).sends is Flow.DOWNSTREAM)
                work = dist.irecv(buffer, group=self.group, group_src=peer)
                self.recvs[post.message] = _Posted(work, buffer)
            i += 1
        self.cursor[peer] = i

    def produced(self, step: int, tensor: torch.Tensor) -> None:
        """Step ``step`` made ``tensor`` for its consumer: post it (and what precedes it)."""
        peer, message = self.plan.sends[step]
        if not isinstance(tensor, torch.Tensor):
            raise RuntimeError(f"{self.label}step {step} produced {type(tensor).__name__}, not a "
                               f"tensor, for pp rank {peer}")
        self.outputs[step] = tensor.contiguous() if not tensor.is_contiguous() else tensor
        self._post(peer, upto=self.send_index[step])

    def prefetch(self, step: int) -> None:
        """Post the receives consumed within ``lookahead`` compute steps of ``step``."""
        for peer in self.plan.queues:
            self._post(peer, window=step + self.lookahead)

    def take(self, step: int) -> torch.Tensor:
        """The input of compute step ``step``, received (waits for it)."""
        peer, message = self.plan.receives[step]
        if message not in self.recvs:
            self._post(peer, upto=self.recv_index[message])
        posted = self.recvs.pop(message)
        self._wait(posted.work, f"receiving {_describe(message)} from pp rank {peer}")
        return posted.tensor

    # ------------------------------------------------------------------------- sends
    def wait_send(self, step: int) -> None:
        posted = self.sends.pop(step, None)
        if posted is not None:
            peer, message = self.plan.sends[step]
            self._wait(posted.work, f"sending {_describe(message)} to pp rank {peer}")

    def send_done(self, step: int) -> bool:
        """True when nothing of step ``step``'s send is pending any more."""
        posted = self.sends.get(step)
        if posted is None:
            return step not in self.outputs
        if posted.work.is_completed():
            self.wait_send(step)
            return True
        return False

    def finish(self) -> None:
        for step in list(self.sends):
            self.wait_send(step)
        left = {peer: len(q) - self.cursor[peer] for peer, q in self.plan.queues.items()
                if self.cursor[peer] < len(q)}
        if left or self.recvs or self.outputs:
            raise RuntimeError(f"{self.label}p2p messages left at the end of the schedule: "
                               f"unposted {left}, unconsumed receives {sorted(self.recvs)}, unsent "
                               f"outputs {sorted(self.outputs)}")

    def _wait(self, work, what: str) -> None:
        started = time.monotonic()
        try:
            if self.device.type == "cpu":
                work.wait(self.timeout)
            else:
                # NCCL: a wait with a timeout blocks the host until the transfer ends (no more
                # overlap of kernel launches); without one it only orders the current stream,
                # and the process group's watchdog (its own timeout) aborts on a dead peer.
                work.wait()
        except RuntimeError as error:
            waited = time.monotonic() - started
            if waited < 0.9 * self.timeout_s:
                why = (f"failed after {waited:.1f} s: the connection to that rank broke "
                       "(did it die?)")
            else:
                why = (f"did not complete within {self.timeout_s:g} s: that rank died, hangs, or "
                       "runs a different schedule")
            raise PeerTimeoutError(f"{self.label}{what} {why} ({error})") from error


def _describe(message) -> str:
    kind, chunk, microbatch = message
    return f"the {OpKind(kind).sends.payload} for chunk {chunk} microbatch {microbatch}"


def _per_chunk(value, chunks: int) -> list:
    if value is None:
        return [None] * chunks
    return list(value) if isinstance(value, (list, tuple)) else [value] * chunks


def run_rank(
    *,
    schedule: Schedule,
    plan: P2PPlan,
    rank: int,
    forward_step_func: Callable,
    data_iterator,
    model: Sequence[torch.nn.Module],
    num_microbatches: int,
    config,
    pp_group,
    tensor_shape: Sequence[int],
    forward_step: Callable,
    backward_step: Callable,
    call_by_name: Callable,
    cp_group_size: int = 1,
    forward_only: bool = False,
    collect_non_loss_data: bool = False,
    first_val_step: bool | None = None,
    offloader=None,
    finalize: Callable[[Any], None] | None = None,
    model_type=None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    lookahead: int = 1,
) -> list:
    """Run ``schedule.ranks[rank]`` (``plan`` = ``schedule.p2p.build_plan(schedule,
    forward_only=forward_only)``); returns Megatron's ``forward_data_store``.

    ``offloader``: an ``ActivationOffloader`` inside ``begin_iteration`` whose runtime list
    is this row (it issues the O / R entries itself), or None (no hooks, O / R skipped).
    ``finalize(total_tokens)`` runs after the last op (finalize_model_grads); not called when
    ``forward_only``."""
    return _RankRun(
        schedule=schedule, plan=plan, rank=rank, forward_step_func=forward_step_func,
        data_iterator=data_iterator, model=model, num_microbatches=num_microbatches,
        config=config, pp_group=pp_group, tensor_shape=tensor_shape, forward_step=forward_step,
        backward_step=backward_step, call_by_name=call_by_name, cp_group_size=cp_group_size,
        forward_only=forward_only, collect_non_loss_data=collect_non_loss_data,
        first_val_step=first_val_step, offloader=offloader, finalize=finalize,
        model_type=model_type, timeout_s=timeout_s, lookahead=lookahead,
    ).run()


class _GradSync:
    """Data-parallel grad / param sync, as Megatron's schedule functions drive it around the
    steps: grad sync disabled (``config.no_sync_func``) from the start; a chunk's last step that
    accumulates weight gradients (``weight_grads`` in the kinds table) runs with it enabled, or
    is followed by ``config.grad_sync_func`` where there is one; the chunks not synced that way
    are synced at the end; ``config.param_sync_func`` for every chunk at the start. Not used by
    forward-only calls (beyond :meth:`enable`, a no-op there)."""

    def __init__(self, config, chunks: list, ops, forward_only: bool) -> None:
        vpp = len(chunks)
        self.chunks = chunks
        self.no_sync_funcs = _per_chunk(getattr(config, "no_sync_func", None), vpp)
        self.grad_sync = _per_chunk(getattr(config, "grad_sync_func", None), vpp)
        self.param_sync = _per_chunk(getattr(config, "param_sync_func", None), vpp)
        self.has_grad_sync = getattr(config, "grad_sync_func", None) is not None
        self.has_param_sync = getattr(config, "param_sync_func", None) is not None
        self.context: contextlib.ExitStack | None = None  # the no_sync contexts, while disabled
        self.last: dict[int, int] = {}  # chunk -> its last step that accumulates weight grads
        if not forward_only:
            for i, op in enumerate(ops):
                if op.kind.weight_grads:
                    self.last[op.chunk] = i
        self.synced: set[int] = set()

    def disable(self) -> None:
        if self.context is None:
            stack = contextlib.ExitStack()
            for fn in self.no_sync_funcs:
                if fn is not None:
                    stack.enter_context(fn())
            self.context = stack

    def enable(self) -> None:
        if self.context is not None:
            self.context.close()
            self.context = None

    def start(self) -> None:
        """Before the first step: grad sync off, params synced."""
        self.disable()
        if self.has_param_sync:
            for c in range(len(self.chunks)):
                self.param_sync[c](self.chunks[c].parameters())

    def before_step(self, step: int, chunk: int) -> None:
        """Without a grad_sync_func, the DDP hooks reduce the chunk's grads during its last
        weight-gradient step: enable them for it."""
        if not self.has_grad_sync and self.last.get(chunk) == step:
            self.enable()
            self.synced.add(chunk)

    def after_step(self, step: int, chunk: int) -> None:
        """With a grad_sync_func, call it right after the chunk's last weight-gradient step;
        grad sync off again for the next step."""
        if self.has_grad_sync and self.last.get(chunk) == step:
            self.enable()
            self.grad_sync[chunk](self.chunks[chunk].parameters())
            self.synced.add(chunk)
        self.disable()

    def finish(self) -> None:
        """After the last step: hooks enabled, the chunks not synced yet synced."""
        self.enable()
        if self.has_grad_sync:
            for c in range(len(self.chunks)):
                if c not in self.synced:
                    self.grad_sync[c](self.chunks[c].parameters())


class _RankRun:
    """One call of :func:`run_rank`: the per-call state (the p2p channels, the units' inputs and
    outputs kept for their backward, the data store, the token count, the grad sync) and one
    handler method per compute kind, registered in :attr:`HANDLERS`. :meth:`run` walks the
    row: per compute op, post the receives due (:meth:`_run_op`), run the op's handler, release
    the outputs whose send completed (:meth:`_release_sent`)."""

    def __init__(self, *, schedule: Schedule, plan: P2PPlan, rank: int, forward_step_func,
                 data_iterator, model, num_microbatches: int, config, pp_group, tensor_shape,
                 forward_step, backward_step, call_by_name, cp_group_size: int,
                 forward_only: bool, collect_non_loss_data: bool, first_val_step,
                 offloader, finalize, model_type, timeout_s: float, lookahead: int) -> None:
        self.chunks = chunks = list(model)
        self.vpp = vpp = len(chunks)
        _check_call(schedule, rank, vpp, num_microbatches, pp_group)
        self.rank, self.pp = rank, schedule.pp
        self.num_microbatches, self.config = num_microbatches, config
        self.forward_only, self.first_val_step = forward_only, first_val_step
        # what the steps are called with (forward_step / backward_step, bound by name)
        self.forward_step_func, self.forward_step = forward_step_func, forward_step
        self.backward_step, self.call_by_name = backward_step, call_by_name
        self.cp_group_size, self.collect_non_loss_data = cp_group_size, collect_non_loss_data
        self.model_type, self.offloader, self.finalize = model_type, offloader, finalize
        self.data = data_iterator if isinstance(data_iterator, list) else [data_iterator] * vpp
        self.label = f"[pp rank {rank}] "
        param = next(chunks[0].parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = getattr(config, "pipeline_dtype", None) or torch.float32
        self.channels = _Channels(plan.ranks[rank], pp_group, shape=tuple(tensor_shape),
                                  dtype=dtype, device=device, timeout_s=timeout_s,
                                  lookahead=lookahead, label=self.label)
        self.rank_plan = plan.ranks[rank]
        self.step_of = {op: i for i, op in enumerate(self.rank_plan.ops)}
        self.deallocate = bool(getattr(config, "deallocate_pipeline_outputs", False))
        self.store: list = []
        self.total_tokens = torch.zeros([], dtype=torch.int, device=device)
        self.inputs: dict = {}  # unit -> its forward's input, until its backward
        self.outputs: dict = {}  # unit -> its forward's output, until its backward
        self.produced_at: dict = {}  # unit -> compute step whose output was sent
        self.grad_sync = _GradSync(config, chunks, self.rank_plan.ops, forward_only)

    # -------------------------------------------------------------------------- the loop
    def run(self) -> list:
        self._check_handlers()
        if not self.forward_only:
            self.grad_sync.start()
        try:
            for op in self.rank_plan.ops:  # compute ops only (the p2p plan's rows)
                self._run_op(op)
            self.channels.finish()
        except BaseException:
            self.grad_sync.enable()  # leave DDP as Megatron's functions would: hooks enabled
            raise
        if not self.forward_only:
            self.grad_sync.finish()
            if self.finalize is not None:
                self.finalize(self.total_tokens)
        return self.store

    def _check_handlers(self) -> None:
        """A kind of this row without a handler: an error naming it, before anything runs."""
        missing = sorted({op.kind for op in self.rank_plan.ops} - self.HANDLERS.keys(),
                         key=lambda kind: kind.code)
        if missing:
            raise NotImplementedError(
                f"{self.label}the executor has no handler for op kind(s) "
                f"{', '.join(f'{kind.name} ({kind.value!r})' for kind in missing)} of this "
                "rank's schedule")

    def _run_op(self, op) -> None:
        step = self.step_of[op]
        self.channels.prefetch(step)
        self.HANDLERS[op.kind](self, step, op.chunk, op.microbatch)
        self._release_sent()

    def _release_sent(self) -> None:
        """Forget the sent outputs whose send completed; with ``deallocate_pipeline_outputs``
        (training), drop their data (the backward keeps their grad_fn)."""
        if not (self.forward_only or self.deallocate):
            return
        for unit, sent in list(self.produced_at.items()):
            if self.channels.send_done(sent):
                del self.produced_at[unit]
                if not self.forward_only:
                    _deallocate(self.outputs[unit])

    # ------------------------------------------------------------------ shared by handlers
    def _received(self, step: int):
        """The input step ``step`` receives (waits for it), or None when it receives none."""
        return self.channels.take(step) if step in self.rank_plan.receives else None

    def _take_output(self, unit) -> torch.Tensor:
        """Take ``unit``'s forward output for its backward; once its send (if any) read it, its
        storage may go (``deallocate_pipeline_outputs``)."""
        output = self.outputs.pop(unit)
        sent = self.produced_at.pop(unit, None)
        if sent is not None:
            self.channels.wait_send(sent)
            if self.deallocate:
                _deallocate(output)
        return output

    # ------------------------------------------------------------------------ handlers
    def _forward(self, step: int, c: int, mb: int) -> None:
        """F: megatron-core's ``forward_step`` on chunk ``c``, microbatch ``mb`` (through the
        offloader's hooks when there is one); posts the output's send."""
        input_tensor = self._received(step)
        first = (
            mb == 0
            if not (self.forward_only and self.first_val_step is not None)
            else (self.first_val_step and mb == 0)
        )

        def step_fn():
            return self.call_by_name(
                self.forward_step, forward_step_func=self.forward_step_func,
                data_iterator=self.data[c], model=self.chunks[c],
                num_microbatches=self.num_microbatches, input_tensor=input_tensor,
                forward_data_store=self.store, config=self.config,
                cp_group_size=self.cp_group_size, collect_non_loss_data=self.collect_non_loss_data,
                checkpoint_activations_microbatch=None, is_first_microbatch=first,
                current_microbatch=mb, vp_stage=c if self.vpp > 1 else None,
                is_last_stage=c == self.vpp - 1 and self.rank == self.pp - 1,
            )

        if self.offloader is not None:
            output, num_tokens = self.offloader.run_forward((c, mb), [input_tensor], step_fn)
        else:
            output, num_tokens = step_fn()
        self.total_tokens += num_tokens
        _forget_input(self.chunks[c])
        if step in self.rank_plan.sends:
            self.channels.produced(step, output)
            self.produced_at[(c, mb)] = step
        if self.forward_only:
            return
        self.inputs[(c, mb)] = input_tensor
        self.outputs[(c, mb)] = output

    def _backward(self, step: int, c: int, mb: int) -> None:
        """B: megatron-core's ``backward_step`` for chunk ``c``, microbatch ``mb`` (through the
        offloader's hooks when there is one), with the chunk's grad sync; posts the input
        gradient's send."""
        output_grad = self._received(step)
        input_tensor = self.inputs.pop((c, mb))
        output = self._take_output((c, mb))
        self.grad_sync.before_step(step, c)

        def step_fn():
            return self.call_by_name(self.backward_step, input_tensor=input_tensor,
                                     output_tensor=output, output_tensor_grad=output_grad,
                                     model_type=self.model_type, config=self.config)

        if self.offloader is not None:
            input_grad = self.offloader.run_backward((c, mb), step_fn)
        else:
            input_grad = step_fn()
        self.grad_sync.after_step(step, c)
        if step in self.rank_plan.sends:
            self.channels.produced(step, input_grad)

    # How this rank runs each compute kind: handler(self, step, chunk, microbatch); the
    # offloader issues the row's copies itself. A new kind of the table (schedule/kinds.py)
    # that reaches the executor needs its handler here.
    HANDLERS: ClassVar[dict[OpKind, Callable[[_RankRun, int, int, int], None]]] = {
        OpKind.FORWARD: _forward,
        OpKind.BACKWARD: _backward,
    }


def _check_call(schedule: Schedule, rank: int, vpp: int, num_microbatches: int,
                pp_group) -> None:
    if vpp != schedule.vpp or num_microbatches != schedule.microbatches:
        raise ValueError(f"schedule is for vpp={schedule.vpp}, m={schedule.microbatches}; called "
                         f"with {vpp} chunks, m={num_microbatches}")
    pp = schedule.pp
    if pp_group.size() != pp or pp_group.rank() != rank:
        raise ValueError(f"schedule for {pp} ranks run as rank {rank} of a pipeline group of size "
                         f"{pp_group.size()} (rank {pp_group.rank()})")


def _forget_input(chunk) -> None:
    """Megatron's model keeps the last input it was given (``set_input_tensor``) until its next
    forward: after a unit's backward that would keep the unit's received activation resident
    (reloaded, if it was offloaded). The forward is done with it: drop the model's reference,
    so that only the unit (autograd, the executor until the backward) holds it."""
    module = chunk
    while not hasattr(module, "set_input_tensor") and hasattr(module, "module"):
        module = module.module
    setter = getattr(module, "set_input_tensor", None)
    if setter is not None:
        setter([None])


def _deallocate(output) -> None:
    """Megatron's ``deallocate_output_tensor``: keep the tensor (its grad_fn), drop its data."""
    if isinstance(output, torch.Tensor) and output._base is None and output.numel() > 1:
        output.data = torch.empty((1,), device=output.device, dtype=output.dtype)
