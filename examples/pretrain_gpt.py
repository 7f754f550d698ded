"""Pretrain a GPT with Megatron-LM's own training loop (``megatron.training.pretrain``).

The project's pretrain script, written against the public ``megatron.training`` API the way
Megatron-LM's ``pretrain_gpt.py`` uses it, for the demo, the tests and ``megatron-offload
train``: a model provider (``GPTModel`` from ``megatron.core.models.gpt``, local or
Transformer Engine layer spec), a dataset provider (mock or indexed data through Megatron's
``BlendedMegatronDatasetBuilder``), a forward step with the masked LM loss, and ``pretrain``.
It knows nothing about offloading: run it through the launcher to get ``--pipeline-offload``::

    torchrun --nproc-per-node 4 -m megatron_offload.launch examples/pretrain_gpt.py \\
        <Megatron-LM flags> --pipeline-offload --offload-policy full

Both argument APIs are handled: megatron-core 0.16/0.17 parse inside ``pretrain`` (the
datasets and model providers are passed positionally); 0.18+ parse with
``parse_and_validate_args`` and hand ``pretrain`` a config container.
"""
from __future__ import annotations

import dataclasses
import inspect
from functools import partial

import torch
from megatron.core import parallel_state as mpu
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.training import get_args, get_tokenizer, pretrain, print_rank_0
from megatron.training.arguments import core_transformer_config_from_args

BATCH_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")


# ------------------------------------------------------------------------------------ model
def layer_spec(args):
    """The transformer layer spec for --transformer-impl (local: megatron-core's own modules)."""
    options = dict(
        num_experts=args.num_experts,
        moe_grouped_gemm=args.moe_grouped_gemm,
        qk_layernorm=args.qk_layernorm,
    )
    if args.transformer_impl == "local":
        return get_gpt_layer_local_spec(**options, normalization=args.normalization)
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    return get_gpt_layer_with_transformer_engine_spec(**options)


def model_provider(pre_process=True, post_process=True, vp_stage=None, **_unused):
    """One model chunk of this pipeline rank (``vp_stage``: its virtual stage)."""
    args = get_args()
    print_rank_0(f"building GPT model (chunk {vp_stage or 0}) ...")
    config = core_transformer_config_from_args(args)
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(args),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        vp_stage=vp_stage,
    )


# ------------------------------------------------------------------------------------- data
def _first_or_last_stage(vp_stage) -> bool:
    first = mpu.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    last = mpu.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return first or last


def dataset_built_on_rank(vp_stage=None) -> bool:
    """Only tensor-parallel rank 0 of the stages that read tokens or labels loads data."""
    return mpu.get_tensor_model_parallel_rank() == 0 and _first_or_last_stage(vp_stage)


def dataset_config(args) -> GPTDatasetConfig:
    """A GPTDatasetConfig from the parsed flags; fields a release lacks are left out."""
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    wanted = dict(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        num_dataset_builder_threads=getattr(args, "num_dataset_builder_threads", 1),
    )
    known = {f.name for f in dataclasses.fields(GPTDatasetConfig)}
    return GPTDatasetConfig(**{k: v for k, v in wanted.items() if k in known})


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    args = get_args()
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    print_rank_0(f"> building train, validation, and test datasets ({dataset_type.__name__}) ...")
    datasets = BlendedMegatronDatasetBuilder(
        dataset_type,
        train_val_test_num_samples,
        partial(dataset_built_on_rank, vp_stage=vp_stage),
        dataset_config(args),
    ).build()
    print_rank_0("> finished creating GPT datasets ...")
    return datasets


train_valid_test_datasets_provider.is_distributed = True


def get_batch(data_iterator, vp_stage=None):
    """This microbatch's tensors: read on tensor-parallel rank 0, broadcast to the others."""
    if not _first_or_last_stage(vp_stage):
        return {key: None for key in BATCH_KEYS}
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    batch = {}
    if mpu.get_tensor_model_parallel_rank() == 0:
        raw = next(data_iterator)
        batch = {k: (raw[k].to(device, non_blocking=True) if raw.get(k) is not None else None)
                 for k in BATCH_KEYS}
    if mpu.get_tensor_model_parallel_world_size() > 1:
        holder = [batch]
        torch.distributed.broadcast_object_list(
            holder,
            src=mpu.get_tensor_model_parallel_src_rank(),
            group=mpu.get_tensor_model_parallel_group(),
        )
        batch = {k: (v.to(device) if v is not None else None) for k, v in holder[0].items()}
    return batch


# ------------------------------------------------------------------------------------- loss
def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Summed masked LM loss, the token count, and the report Megatron averages over ranks."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}
    return loss, num_tokens, report


def forward_step(data_iterator, model: GPTModel):
    from megatron.core.utils import get_attr_wrapped_model
    from megatron.training import get_timers

    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    batch = get_batch(data_iterator, get_attr_wrapped_model(model, "vp_stage"))
    timers("batch-generator").stop()
    output_tensor = model(
        batch["tokens"],
        batch["position_ids"],
        batch["attention_mask"],
        labels=batch["labels"],
    )
    return output_tensor, partial(loss_func, batch["loss_mask"])


# ------------------------------------------------------------------------------------- main
def main() -> None:
    defaults = {"tokenizer_type": "NullTokenizer"}
    takes_container = next(iter(inspect.signature(pretrain).parameters)) == "cfg_container"
    if not takes_container:  # megatron-core 0.16 / 0.17: pretrain parses the flags itself
        pretrain(
            train_valid_test_datasets_provider,
            model_provider,
            ModelType.encoder_or_decoder,
            forward_step,
            args_defaults=defaults,
        )
        return
    # megatron-core 0.18+: parse and validate here, hand pretrain a config container
    import warnings

    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    args = parse_and_validate_args(args_defaults=defaults)
    with warnings.catch_warnings():
        # "It is recommended to use a ModelConfig ... instead of a model provider": this
        # script keeps the model-provider API that every supported release accepts.
        warnings.filterwarnings("ignore", message=r"\s*It is recommended to use a ModelConfig")
        container = pretrain_cfg_container_from_args(args)
    pretrain(  # by keyword: 0.18 takes model_provider third, 0.19 after forward_step_func
        container,
        train_valid_test_dataset_provider=train_valid_test_datasets_provider,
        model_provider=model_provider,
        model_type=ModelType.encoder_or_decoder,
        forward_step_func=forward_step,
    )


if __name__ == "__main__":
    main()
