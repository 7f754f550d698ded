"""The project's own sbatch script under a real Slurm (single node, loopback, CPU, gloo).

The scripts in ``scripts/slurm/`` are submitted unchanged except for sbatch's own overrides
of their ``#SBATCH`` headers (2 fake GPUs, fewer CPUs) and their environment knobs (PYTHON,
PRETRAIN_SCRIPT, MEGATRON_ARGS, OFFLOAD_ARGS, GPUS_PER_NODE): 2 ranks each run ``python -m
megatron_offload.launch examples/pretrain_gpt.py`` (Megatron-LM's pretrain(), tiny GPT,
PP=2 x VPP=2, mock data, gloo). ``pretrain_srun.sbatch`` (2 srun tasks) offloads
(``--offload-policy full``), ``pretrain_torchrun.sbatch`` (1 task, torchrun with 2 workers)
only measures (``none``); both must complete, the losses Megatron logged in each job's
output file must be finite for every iteration and identical between the two, and the
offloading job's ``[pipeline offload]`` lines and record must show offloaded == reloaded.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import pytest

from megatron_offload.cli.train import CPU_FLAGS, SMALL_GPT

pytestmark = pytest.mark.slow
pytest.importorskip("megatron.training", reason="megatron-core >= 0.17 ships megatron/training")

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts" / "slurm"
SBATCH_ARGS = {
    # one task per GPU: 2 tasks, 2 (fake) GPUs, 1 CPU each
    "srun": ("pretrain_srun.sbatch", ["--ntasks-per-node=2", "--gpus-per-node=2",
                                      "--cpus-per-task=1"]),
    # one task per node running torchrun with GPUS_PER_NODE=2 workers
    "torchrun": ("pretrain_torchrun.sbatch", ["--gpus-per-node=2", "--cpus-per-task=2"]),
}
JOBS = {"full": ("srun", "full"), "none": ("torchrun", "none")}
"""Job name: (sbatch script, offload policy). Two jobs keep the test near a minute: the
offloading one through srun (one task per rank), the measuring one through torchrun."""
ITERS = 3
TINY = {**SMALL_GPT, **CPU_FLAGS, "--num-layers": "4", "--hidden-size": "64",
        "--seq-length": "32", "--max-position-embeddings": "32", "--vocab-size": "128",
        "--global-batch-size": "8", "--pipeline-model-parallel-size": "2",
        "--train-iters": str(ITERS)}
OFFLOAD = "--pipeline-offload --offload-report --offload-min-bytes 0 --offload-policy"

ITERATION = re.compile(r"\] iteration\s+(\d+)/\s*(\d+) \|.*\| lm loss: (\S+) \|")
FIGURES = re.compile(r"\[pipeline offload\] iteration\s+(\d+)/\s*\d+ \| pp rank (\d+) \| "
                     r"offloaded \(MiB\): (\S+) \| reloaded \(MiB\): (\S+) \|")


def _megatron_args() -> str:
    return " ".join(flag if value is None else f"{flag} {value}" for flag, value in TINY.items())


def _submit(slurm, tmp: Path, name: str) -> tuple[str, Path]:
    variant, policy = JOBS[name]
    script, sbatch_args = SBATCH_ARGS[variant]
    folder = tmp / name
    folder.mkdir()
    env = {
        "PYTHON": sys.executable,  # the test's venv; the package from this checkout
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PRETRAIN_SCRIPT": str(ROOT / "examples" / "pretrain_gpt.py"),
        "MEGATRON_ARGS": _megatron_args(),
        "OFFLOAD_ARGS": f"{OFFLOAD} {policy}",
        "JOB_LOG_DIR": str(folder / "job"),
        "CUDA_VISIBLE_DEVICES": "",
        "GPUS_PER_NODE": "2",
    }
    job = slurm.submit(SCRIPTS / script, *sbatch_args, f"--job-name=offload-{name}",
                       f"--output={folder}/%x-%j.out", env=env, cwd=folder)
    return job, folder


def _losses(text: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(3) for m in ITERATION.finditer(text)}


@pytest.fixture(scope="module")
def jobs(slurm, tmp_path_factory):
    """All jobs submitted at once (Slurm runs them one after the other on the 2 CPUs)."""
    tmp = tmp_path_factory.mktemp("jobs")
    submitted = {name: _submit(slurm, tmp, name) for name in JOBS}
    out = {}
    for name, (job, folder) in submitted.items():
        fields = slurm.wait(job, timeout=240)
        output = Path(fields["StdOut"])
        text = output.read_text(errors="replace") if output.is_file() else "(no output file)"
        out[name] = {"job": job, "fields": fields, "text": text, "folder": folder}
    return out


@pytest.mark.parametrize("name", list(JOBS))
def test_job_completes(jobs, name):
    job = jobs[name]
    state = (job["fields"]["JobState"], job["fields"]["ExitCode"])
    assert state == ("COMPLETED", "0:0"), f"job {job['job']} {state}:\n{job['text'][-4000:]}"
    # MASTER_ADDR from `scontrol show hostnames`, MASTER_PORT from the job id
    assert f"localhost:{10000 + int(job['job'])}," in job["text"], job["text"][:2000]
    if JOBS[name][0] == "srun":  # srun -l: one task per rank
        assert re.search(r"^0: ", job["text"], re.M) and re.search(r"^1: ", job["text"], re.M)


@pytest.mark.parametrize("name", list(JOBS))
def test_every_iteration_logged_a_finite_loss(jobs, name):
    losses = _losses(jobs[name]["text"])
    assert sorted(losses) == list(range(1, ITERS + 1)), jobs[name]["text"][-4000:]
    assert all(math.isfinite(float(loss)) for loss in losses.values()), losses


@pytest.mark.parametrize("name", ["full"])
def test_offload_moved_and_reloaded_every_byte(jobs, name):
    figures = FIGURES.findall(jobs[name]["text"])
    assert {(int(i), int(s)) for i, s, _, _ in figures} == {
        (i, s) for i in range(1, ITERS + 1) for s in (0, 1)}, jobs[name]["text"][-4000:]
    assert all(off == rel and float(off) > 0 for _, _, off, rel in figures), figures
    record = json.loads((jobs[name]["folder"] / "job" / "offload-record.json").read_text())
    for rank in record["ranks"]:  # the exact byte counts, per rank and iteration
        for it in rank["iterations"]:
            assert it["offloaded_bytes"] == it["reloaded_bytes"] > 0, it


def test_losses_identical_with_and_without_offload(jobs):
    full, none = _losses(jobs["full"]["text"]), _losses(jobs["none"]["text"])
    assert full == none  # (and the same job through srun and through torchrun)
    moved = FIGURES.findall(jobs["none"]["text"])
    assert moved and all(float(off) == 0 for _, _, off, _ in moved), moved
