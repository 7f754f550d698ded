"""Drive one pipeline rank's op order in a single process, with or without the offloader.

Used where several ranks cannot run: the GPU check on a single lent GPU (NCCL refuses two
ranks on one device) and the runtime's own tests. Chunk c of the rank is ``chunks[c]``; the
input of chunk c > 0 for a microbatch is chunk c-1's output for it, detached and marked
requires_grad like a tensor received over p2p, so the op order, lifespans and aliasing match
a real rank (rank 0 of an interleaved pipeline sees the same order).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_offload.runtime.offloader import ActivationOffloader, iteration
from megatron_offload.schedule.ir import Op
from megatron_offload.schedule.kinds import OpKind


def drive(
    chunks: Sequence[torch.nn.Module],
    order: Sequence[Op],
    inputs: dict[int, torch.Tensor],
    offloader: ActivationOffloader | None = None,
    offload_units: set | None = None,
    *,
    peak_memory: bool = False,
) -> dict:
    """Run ``order`` once; returns grads, per-microbatch losses and, on CUDA, peak bytes."""
    for chunk in chunks:
        chunk.zero_grad(set_to_none=True)
    device = inputs[next(iter(inputs))].device
    received: dict[tuple[int, int], torch.Tensor] = {}
    outputs: dict[tuple[int, int], torch.Tensor] = {}
    grad_to_previous: dict[int, torch.Tensor] = {}
    losses: dict[int, torch.Tensor] = {}
    last = len(chunks) - 1
    if peak_memory and device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)

    def forward(chunk: int, mb: int):
        x = received[(chunk, mb)]
        y = chunks[chunk](x)
        if chunk == last:
            loss = y.float().pow(2).mean()
            losses[mb] = loss.detach()
            return (loss,)
        return (y,)

    def backward(chunk: int, mb: int):
        out = outputs.pop((chunk, mb))
        if chunk == last:
            out.backward()
        else:
            out.backward(grad_to_previous.pop(mb))
        x = received.pop((chunk, mb))
        if chunk > 0:
            grad_to_previous[mb] = x.grad

    def body():
        for op in order:
            key = (op.chunk, op.microbatch)
            if op.kind is OpKind.FORWARD:
                source = (
                    inputs[op.microbatch]
                    if op.chunk == 0
                    else outputs[(op.chunk - 1, op.microbatch)]
                )
                received[key] = source.detach().clone().requires_grad_(op.chunk > 0)
                step = lambda c=op.chunk, m=op.microbatch: forward(c, m)  # noqa: E731
                if offloader is None:
                    result = step()
                else:
                    result = offloader.run_forward(key, [received[key]], step)
                outputs[key] = result[0]
            elif op.kind is OpKind.BACKWARD:
                step = lambda c=op.chunk, m=op.microbatch: backward(c, m)  # noqa: E731
                if offloader is None:
                    step()
                else:
                    offloader.run_backward(offloader.unit_for_output(outputs[key]), step)

    if offloader is None:
        body()
    else:
        with iteration(offloader, order, set(offload_units or ())):
            body()
    result = {
        "grads": [p.grad.detach().clone() for chunk in chunks for p in chunk.parameters()],
        "losses": [losses[mb] for mb in sorted(losses)],
    }
    if peak_memory and device.type == "cuda":
        torch.cuda.synchronize(device)
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
    return result


def interleaved_rank0_order(pp: int, vpp: int, microbatches: int) -> list[Op]:
    """Megatron-Core's interleaved 1F1B order for pipeline rank 0 (group size = pp)."""
    from megatron_offload.schedule.megatron import megatron_order

    kind = "interleaved" if vpp > 1 else "1f1b"
    return list(megatron_order(kind, pp, 0, vpp, microbatches, pp))
