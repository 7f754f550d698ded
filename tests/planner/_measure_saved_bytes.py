"""Dev tool (not a test): measure the saved-activation bytes of megatron-core's GPTModel (local
spec, CPU) per layer and for the rest of the model, the way the MEASURED table of
test_costmodel.py was made.

    .venv/bin/python tests/planner/_measure_saved_bytes.py '[{"hidden_size": 64, ...}]'

Each JSON object is TinyGPTCase keyword arguments, plus an optional "cfg" dict of
TransformerConfig attributes to set after it is built (e.g. {"hidden_dropout": 0.1}). For one
and two layers (pp = 1, one microbatch) the forward runs under saved-tensor hooks that record
every saved tensor's storage (parameters and buffers excluded); bytes are the unique storages'
sizes at the end of the forward (a storage Megatron released, CheckpointWithoutOutput's, counts
0), as the runtime counts them. per_layer = two layers - one layer; rest = one layer - per_layer.
Single process, gloo world of 1.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

import megatron_offload.testing.gpt as gpt
from megatron_offload.testing.gpt import TinyGPTCase, build_model, synthetic_batch
from megatron_offload.testing.reference import (
    ensure_cpu_shims,
    init_parallel_state,
    release_parallel_state,
)

_OVERRIDES: dict = {}
_build_config = gpt.transformer_config


def _config(case):
    config = _build_config(case)
    for key, value in _OVERRIDES.items():
        setattr(config, key, value)
    return config


gpt.transformer_config = _config


def saved_bytes(case: TinyGPTCase) -> int:
    init_parallel_state(case)
    try:
        model = build_model(case)[0]
        skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        skip |= {b.untyped_storage().data_ptr() for b in torch.nn.Module.buffers(model)}
        storages = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if not isinstance(tensor, torch.nn.Parameter) and storage.data_ptr() not in skip:
                storages.setdefault(storage.data_ptr(), storage)
            return tensor

        batch = synthetic_batch(case, iteration=0, dp_rank=0, microbatch=0)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                        attention_mask=batch["attention_mask"], labels=batch["labels"])
        total = sum(storage.nbytes() for storage in storages.values())
        out.float().sum().backward()
        return total
    finally:
        release_parallel_state()


def main(cases: list[dict]) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    ensure_cpu_shims()
    for kwargs in cases:
        kwargs = dict(kwargs)
        _OVERRIDES.clear()
        _OVERRIDES.update(kwargs.pop("cfg", {}))
        one, two = (saved_bytes(TinyGPTCase(pp=1, num_layers=n, microbatches=1, **kwargs))
                    for n in (1, 2))
        print(json.dumps({"case": kwargs, "cfg": dict(_OVERRIDES), "per_layer": two - one,
                          "rest": 2 * one - two}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
