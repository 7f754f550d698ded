"""The Slurm scripts without Slurm: syntax, headers, and bind.sh's per-rank NUMA choice."""
from __future__ import annotations

import re
import stat
import subprocess
from pathlib import Path

import pytest

SLURM = Path(__file__).resolve().parents[2] / "scripts" / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sbatch"))


def test_both_scripts_exist():
    assert [p.name for p in SCRIPTS] == ["pretrain_srun.sbatch", "pretrain_torchrun.sbatch"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_has_the_headers(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for header in ("--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task",
                   "--time", "--output=logs/%x-%j.out"):
        assert re.search(rf"^#SBATCH {re.escape(header)}", text, re.M), header
    for knob in ("PYTHON", "PRETRAIN_SCRIPT", "MEGATRON_ARGS", "OFFLOAD_ARGS", "MASTER_ADDR",
                 "MASTER_PORT"):
        assert f"{knob}=" in text, knob
    assert "--pipeline-offload --offload-policy full" in text
    assert "--container-image" in text and "--cpu-bind" in text


def _bind(env: dict, tmp_path: Path, numactl: bool) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "numactl"
    if numactl:
        fake.write_text('#!/bin/sh\necho "numactl $*"\n')
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    elif fake.exists():
        fake.unlink()
    full = {"PATH": f"{bin_dir}:/usr/bin:/bin", **env}
    return subprocess.run([str(SLURM / "bind.sh"), "echo", "run"], env=full, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_bind_runs_the_command_unchanged_by_default(tmp_path):
    assert _bind({"SLURM_LOCALID": "5"}, tmp_path, numactl=True) == "run"
    assert _bind({"BIND_NUMA": "1", "SLURM_LOCALID": "5"}, tmp_path, numactl=False) == "run"


@pytest.mark.parametrize("rank,node", [("0", 0), ("3", 0), ("4", 1), ("7", 1)])
def test_bind_picks_the_gpus_numa_node(tmp_path, rank, node):
    out = _bind({"BIND_NUMA": "1", "SLURM_LOCALID": rank, "SLURM_NTASKS_PER_NODE": "8",
                 "NUMA_NODES": "2"}, tmp_path, numactl=True)
    assert out == f"numactl --cpunodebind={node} --membind={node} echo run"
    torchrun = _bind({"BIND_NUMA": "1", "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": "8",
                      "NUMA_NODES": "2"}, tmp_path, numactl=True)
    assert torchrun == out
