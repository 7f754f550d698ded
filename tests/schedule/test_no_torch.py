import subprocess
import sys


def test_schedule_package_and_simulate_cli_never_import_torch():
    code = (
        "import sys, megatron_offload.schedule as s\n"
        "from megatron_offload.schedule import catalog, costs, gis, ir, layer_sim, layers, "
        "megatron, offload, render, render_layers, simulate, validate\n"
        "import megatron_offload.cli, megatron_offload.cli.simulate\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
