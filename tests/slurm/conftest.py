"""A real single-node Slurm for the tests in this folder (see _local_slurm.py): installed with
apt-get when missing, started once for the module in a scratch folder, torn down after."""
from __future__ import annotations

import pytest

from _local_slurm import LocalSlurm, SlurmUnavailable, ensure_installed


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        ensure_installed()
    except SlurmUnavailable as error:  # CI runs this test: a missing Slurm is a failure
        pytest.fail(str(error), pytrace=False)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmUnavailable as error:
        cluster.stop()
        pytest.fail(str(error), pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()
    assert not cluster.running(), f"Slurm daemons left running:\n{cluster.daemon_logs()}"
