"""The local-Slurm harness's own failure path: no Slurm and no apt-get is a clear failure."""
from __future__ import annotations

import pytest

import _local_slurm


def test_missing_slurm_without_apt_get_names_the_packages(monkeypatch):
    monkeypatch.setattr(_local_slurm.shutil, "which", lambda name: None)
    with pytest.raises(_local_slurm.SlurmUnavailable, match="slurmctld slurmd slurm-client"):
        _local_slurm.ensure_installed()


def test_failed_apt_get_reports_its_output(monkeypatch):
    monkeypatch.setattr(_local_slurm.shutil, "which",
                        lambda name: "/usr/bin/apt-get" if name == "apt-get" else None)

    class Done:
        returncode, stdout, stderr = 100, "", "E: Unable to locate package slurmd"

    monkeypatch.setattr(_local_slurm.subprocess, "run", lambda *a, **k: Done())
    with pytest.raises(_local_slurm.SlurmUnavailable, match="Unable to locate package"):
        _local_slurm.ensure_installed()
