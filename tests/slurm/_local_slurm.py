"""A real single-node Slurm on this machine for the tests (Debian's slurmctld/slurmd/slurm-client,
loopback only):

- Debian's packages are installed with apt-get when missing (about 6 s); when that is
  impossible the caller fails with :class:`SlurmUnavailable`'s message (CI must not skip);
- ``slurm.conf`` and all state, logs and pid files live in one scratch folder; clients and
  daemons find the file through ``SLURM_CONF`` (nothing is written to /etc/slurm);
  ``auth/none`` + ``cred/none`` (no munge), free ports, one node ``localhost`` with fake GPUs
  (``Gres=gpu:N``, each device a symlink to /dev/null) so ``#SBATCH --gpus-per-node`` works;
- :meth:`LocalSlurm.stop` cancels the jobs, SIGTERMs each daemon by its pid file and
  SIGKILLs the stragglers.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client")
BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel", "srun")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


class SlurmUnavailable(RuntimeError):
    """Slurm could not be installed or started here."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed(timeout: float = 600) -> None:
    """Install Debian's Slurm packages if a binary is missing (apt-get, as root)."""
    if all(shutil.which(b) for b in BINARIES):
        return
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(
            "Slurm is not installed and apt-get is not available: install Debian's "
            f"{' '.join(PACKAGES)} (the local-Slurm test needs a real slurmctld/slurmd)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    sudo = ["sudo", "-E"] if os.geteuid() != 0 and shutil.which("sudo") else []
    install = [*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    update = [*sudo, "apt-get", "update", "-q"]
    log = []
    # without package lists (a fresh container) update first; else try the install alone
    for step in ([install] if _apt_lists_present() else []) + [update, install]:
        proc = subprocess.run(step, env=env, capture_output=True, text=True, timeout=timeout)
        log.append(f"$ {' '.join(step)} (exit {proc.returncode})\n{proc.stdout[-1500:]}"
                   f"{proc.stderr[-1500:]}")
        if step is install and proc.returncode == 0 and all(shutil.which(b) for b in BINARIES):
            return
    raise SlurmUnavailable(
        f"could not install Slurm ({' '.join(PACKAGES)}) with apt-get; the local-Slurm test "
        "needs a real slurmctld/slurmd (root and Debian's package mirror):\n" + "\n".join(log))


def _apt_lists_present() -> bool:
    lists = Path("/var/lib/apt/lists")
    return lists.is_dir() and any(p.name.endswith("_Packages") for p in lists.iterdir())


class LocalSlurm:
    """One controller and one slurmd on 127.0.0.1, all files under ``scratch``."""

    def __init__(self, scratch: Path, cpus: int = 2, gpus: int = 2):
        self.scratch = Path(scratch)
        self.cpus, self.gpus = cpus, gpus
        self.conf = self.scratch / "slurm.conf"
        self.state = self.scratch / "state"
        self.logs = self.scratch / "log"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for name in list(self.env):  # a test run inside a Slurm job must not leak its job here
            if name.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and name != "SLURM_CONF":
                del self.env[name]
        self.jobs: list[str] = []

    # ------------------------------------------------------------------ files
    @property
    def ctld_pid_file(self) -> Path:
        return self.state / "slurmctld.pid"

    @property
    def slurmd_pid_file(self) -> Path:
        return self.state / "slurmd-localhost.pid"

    def write_config(self) -> None:
        for folder in (self.state / "ctld", self.state / "d", self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        fake = self.scratch / "fakegpu"
        fake.mkdir(exist_ok=True)
        for i in range(self.gpus):
            link = fake / f"nvidia{i}"
            if not link.exists():
                link.symlink_to("/dev/null")
        s = self.scratch
        gres_node = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        self.conf.write_text(f"""\
ClusterName=ci
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation={s}/state/ctld
SlurmdSpoolDir={s}/state/d/%n
SlurmctldPidFile={s}/state/slurmctld.pid
SlurmdPidFile={s}/state/slurmd-%n.pid
SlurmctldLogFile={s}/log/slurmctld.log
SlurmdLogFile={s}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
MinJobAge=3600
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 Port={_free_port()} CPUs={self.cpus} RealMemory=4000{gres_node} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")  # noqa: E501 (slurm.conf lines do not wrap)
        if self.gpus:
            (self.scratch / "gres.conf").write_text(
                f"Name=gpu File={fake}/nvidia[0-{self.gpus - 1}]\n")

    # ------------------------------------------------------------------ daemons
    def _run(self, *argv: str, timeout: float = 30, check: bool = True) -> str:
        proc = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: "
                               f"{proc.stdout}{proc.stderr}\n{self.daemon_logs()}")
        return proc.stdout

    def start(self, timeout: float = 30) -> None:
        self.write_config()
        for argv in (["slurmctld"], ["slurmd", "-N", "localhost"]):
            proc = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=30)
            if proc.returncode != 0:
                raise SlurmUnavailable(f"{argv[0]} did not start (exit {proc.returncode}): "
                                       f"{proc.stdout}{proc.stderr}\n{self.daemon_logs()}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._alive(self.ctld_pid_file):
                out = subprocess.run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], env=self.env,
                                     capture_output=True, text=True, timeout=15).stdout
                if "localhost" in out:
                    return
            time.sleep(0.25)
        raise SlurmUnavailable(f"the node did not become idle within {timeout:.0f} s\n"
                               f"{self.daemon_logs()}")

    @staticmethod
    def _pid(pid_file: Path) -> int | None:
        try:
            return int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _alive(self, pid_file: Path) -> bool:
        pid = self._pid(pid_file)
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def daemon_logs(self, lines: int = 30) -> str:
        out = []
        for path in sorted(self.logs.glob("*.log")) if self.logs.is_dir() else []:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(out)

    def stop(self, grace: float = 5.0) -> None:
        """scancel every job, SIGTERM the daemons by pid file, SIGKILL the stragglers."""
        if self._alive(self.ctld_pid_file):  # a client call against a dead controller hangs ~9 s
            subprocess.run(["scancel", "--full", *self.jobs] if self.jobs else ["true"],
                           env=self.env, capture_output=True, timeout=15)
            if self.jobs:
                time.sleep(0.5)
        pids = [p for p in (self._pid(self.slurmd_pid_file), self._pid(self.ctld_pid_file))
                if p is not None]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for pid in pids:
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def running(self) -> bool:
        """Whether a daemon of this cluster is still alive (after :meth:`stop`: none)."""
        return self._alive(self.ctld_pid_file) or self._alive(self.slurmd_pid_file)

    # ------------------------------------------------------------------ jobs
    def submit(self, script: str | Path, *sbatch_args: str, env: dict | None = None,
               cwd: str | Path | None = None) -> str:
        """``sbatch --parsable [args] script``; the job's environment is ``env`` (exported)."""
        job_env = dict(self.env, **(env or {}))
        proc = subprocess.run(["sbatch", "--parsable", *sbatch_args, str(script)], env=job_env,
                              capture_output=True, text=True, timeout=30, cwd=cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch exited {proc.returncode}: {proc.stdout}{proc.stderr}")
        job = proc.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def job(self, job: str) -> dict:
        """``scontrol show job <id> -o`` as a dict (JobState, ExitCode, StdOut, ...)."""
        line = self._run("scontrol", "show", "job", job, "-o", timeout=15)
        fields = {}
        for item in line.split():
            key, sep, value = item.partition("=")
            if sep:
                fields[key] = value
        return fields

    def wait(self, job: str, timeout: float = 120, poll: float = 0.5) -> dict:
        """Poll until the job ends; returns its last ``scontrol show job`` fields."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job(job)
            if fields.get("JobState") in TERMINAL_STATES:
                return fields
            if time.monotonic() > deadline:
                self._run("scancel", job, check=False)
                raise TimeoutError(f"job {job} still {fields.get('JobState')} after "
                                   f"{timeout:.0f} s: {fields}")
            time.sleep(poll)
