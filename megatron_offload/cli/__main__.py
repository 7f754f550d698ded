"""``python -m megatron_offload.cli``: the ``megatron-offload`` command."""
import sys

from megatron_offload.cli import main

sys.exit(main())
