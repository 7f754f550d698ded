"""The patch sets that stand on Megatron-LM's ``megatron/training`` (megatron-core 0.17+, as
this whole folder) list in their module docstrings every symbol they replace: the launcher's
(``integration/megatron_lm.py``) and the CPU support of Megatron-LM's loop
(``integration/cpu/training.py``)."""
from __future__ import annotations

from _patch_docs import listed_symbols


def test_the_megatron_lm_patch_set_lists_its_symbols():
    import megatron.training as package
    from megatron.core.datasets import utils as dataset_utils
    from megatron.training import arguments, training

    from megatron_offload.integration import megatron_lm

    state = megatron_lm.LaunchState(launch=None)
    symbols = [p.symbol for p in megatron_lm.launch_patches(state, package, arguments, training,
                                                            dataset_utils)]
    assert [s for s in symbols if s not in listed_symbols(megatron_lm.__doc__)] == []


def test_the_cpu_training_patch_set_lists_its_symbols():
    from megatron_offload.integration.cpu import training

    symbols = [p.symbol for p in training._patches()]
    assert [s for s in symbols if s not in listed_symbols(training.__doc__)] == []
