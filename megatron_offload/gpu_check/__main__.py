"""``python -m megatron_offload.gpu_check``: run the GPU check (see :mod:`.check`)."""
import sys

from megatron_offload.gpu_check.check import main

sys.exit(main())
