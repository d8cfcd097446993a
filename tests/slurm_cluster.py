"""A real one-node SLURM cluster on this machine, for the SLURM workflow test and CI.

    python tests/slurm_cluster.py start    # install if needed, configure, start, wait until the node is idle
    python tests/slurm_cluster.py stop     # stop the daemons that `start` started (and nothing else)
    python tests/slurm_cluster.py status
    python tests/slurm_cluster.py --install-only   # apt-get install slurm-wlm munge if sbatch is missing

Idempotent: a cluster that already answers (`sinfo` shows the node usable) is reused as it is, and only
the daemons that are missing are started. Every daemon this module starts is recorded (pid + command)
in STATE_FILE, so `stop` - from another process, e.g. the end of .ci/run - kills exactly those.

Why the default config path (/etc/slurm/slurm.conf) and not SLURM_CONF: the executor plugin's job step
strips SLURM_CONF before its inner `srun`, which then could not find a config anywhere else.

Standard library only: .ci/start_slurm.sh runs it with whatever python3 the CI machine has.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

LOG = logging.getLogger("slurm_cluster")

SLURM_CONF = Path("/etc/slurm/slurm.conf")
# First line of every slurm.conf we write: tells ours apart from a real cluster's config.
CONF_MARKER = "# Written by llm-energy tests/slurm_cluster.py (one-node test cluster)."
STATE_DIR = Path("/run/llm-energy-slurm")
STATE_FILE = STATE_DIR / "daemons.json"
LOG_DIR = Path("/var/log/slurm")
NODE_NAME = "localhost"
# Two partitions on the one node, named like those the shipped profile (workflow/profiles/slurm) asks
# for, so the test submits with the shipped partition names unchanged.
DEFAULT_PARTITION = "cpu"
PARTITIONS = (DEFAULT_PARTITION, "gpu")
# MB kept free for the OS: slurmd drains a node whose RealMemory exceeds what it finds.
MEMORY_MARGIN_MB = 1024
# The executor plugin's squeue status check needs finished jobs to stay visible for a while (>= 120 s).
MIN_JOB_AGE_S = 300
# Node states (sinfo %t, without the '*'/'~'/'#' suffixes) in which the node accepts jobs.
USABLE_NODE_STATES = {"idle", "mix", "alloc", "comp"}


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started on this machine (the test skips with this message)."""


@dataclass
class StartedDaemon:
    name: str
    pid: int
    argv: list[str]
    log_path: str


@dataclass
class SlurmCluster:
    """A usable cluster; `started` lists the daemons this call started (empty when reused as is)."""

    node_name: str
    default_partition: str
    cpus: int
    real_memory_mb: int
    started: list[StartedDaemon] = field(default_factory=list)

    @property
    def reused(self) -> bool:
        return not self.started


def _run(argv: list[str], timeout_s: float = 30, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=check)


def _is_root() -> bool:
    return os.geteuid() == 0


# ---------------------------------------------------------------------------------------------- install


def install_slurm() -> None:
    """apt-get install slurm-wlm and munge when sbatch is missing (needs root and Debian's archive)."""
    if shutil.which("sbatch") and shutil.which("slurmctld") and shutil.which("munged"):
        return
    if not _is_root() or not shutil.which("apt-get"):
        raise SlurmUnavailable(
            "sbatch is not installed and cannot be installed here (needs root and apt-get): "
            "install the packages slurm-wlm and munge, or run .ci/start_slurm.sh as root"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    LOG.info("installing slurm-wlm and munge with apt-get")
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr[-2000:]}")
    if not shutil.which("sbatch"):
        raise SlurmUnavailable("apt-get installed slurm-wlm but sbatch is still not on PATH")


# ----------------------------------------------------------------------------------------------- config


def node_resources() -> tuple[int, int]:
    """(CPUs, RealMemory MB) to declare: what slurmd itself detects, memory minus a margin."""
    cpus = os.cpu_count() or 1
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    # slurmd -C prints what slurmd will check the declaration against; trust it when it answers.
    try:
        proc = _run(["slurmd", "-C"], timeout_s=15)
        for token in proc.stdout.split():
            key, _, value = token.partition("=")
            if key == "CPUs" and value.isdigit():
                cpus = int(value)
            elif key == "RealMemory" and value.isdigit():
                memory_mb = min(memory_mb, int(value))
    except (OSError, subprocess.SubprocessError) as error:
        LOG.warning("slurmd -C failed (%s); using os.cpu_count() and the physical memory", error)
    return cpus, max(256, memory_mb - MEMORY_MARGIN_MB)


def slurm_conf_text(cpus: int, real_memory_mb: int) -> str:
    partitions = "\n".join(
        f"PartitionName={name} Nodes={NODE_NAME} Default={'YES' if name == DEFAULT_PARTITION else 'NO'} "
        "MaxTime=INFINITE State=UP"
        for name in PARTITIONS
    )
    return f"""{CONF_MARKER}
ClusterName=llm-energy-test
SlurmctldHost={NODE_NAME}
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile={LOG_DIR}/slurmctld.log
SlurmdLogFile={LOG_DIR}/slurmd.log
# No cgroups in containers: plain /proc process tracking, no task confinement.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# No slurmdbd: sacct does not work, the workflow uses `squeue` for job status.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Finished jobs stay visible to squeue this long (the executor plugin needs >= 120 s).
MinJobAge={MIN_JOB_AGE_S}
# A node that was down comes back as soon as its slurmd registers again.
ReturnToService=2
SchedulerType=sched/backfill
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName={NODE_NAME} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={real_memory_mb} State=UNKNOWN
{partitions}
"""


def write_slurm_conf(cpus: int, real_memory_mb: int) -> bool:
    """Write /etc/slurm/slurm.conf; True when it changed. A config not written by us is kept as .bak."""
    text = slurm_conf_text(cpus, real_memory_mb)
    if SLURM_CONF.is_file():
        current = SLURM_CONF.read_text()
        if current == text:
            return False
        if not current.startswith(CONF_MARKER):
            backup = SLURM_CONF.with_name(f"slurm.conf.bak-{int(time.time())}")
            LOG.warning("keeping the existing %s as %s", SLURM_CONF, backup)
            shutil.copy2(SLURM_CONF, backup)
    SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
    tmp = SLURM_CONF.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, SLURM_CONF)
    return True


# ------------------------------------------------------------------------------------------------ state


def _load_state() -> list[StartedDaemon]:
    try:
        return [StartedDaemon(**entry) for entry in json.loads(STATE_FILE.read_text())]
    except FileNotFoundError:
        return []
    except (ValueError, TypeError) as error:
        LOG.warning("ignoring unreadable %s: %s", STATE_FILE, error)
        return []


def _save_state(daemons: list[StartedDaemon]) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    alive = [daemon for daemon in daemons if _is_same_process(daemon)]
    if alive:
        STATE_FILE.write_text(json.dumps([asdict(daemon) for daemon in alive], indent=1))
    else:
        STATE_FILE.unlink(missing_ok=True)


# Popen objects of the daemons this process started: poll() tells their exit reliably and reaps them.
_CHILDREN: dict[int, subprocess.Popen] = {}


def _is_same_process(daemon: StartedDaemon) -> bool:
    """True while `daemon.pid` is still the process we started (not a recycled pid, not a zombie)."""
    if daemon.pid in _CHILDREN:
        return _CHILDREN[daemon.pid].poll() is None
    try:
        cmdline = Path(f"/proc/{daemon.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and cmdline[0].decode(errors="replace") == daemon.argv[0]


# ----------------------------------------------------------------------------------------------- checks


def munge_works() -> bool:
    if not shutil.which("munge"):
        return False
    try:
        encoded = _run(["munge", "-n"], timeout_s=10)
        if encoded.returncode != 0:
            return False
        decoded = subprocess.run(["unmunge"], input=encoded.stdout, capture_output=True, text=True, timeout=10)
        return decoded.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def controller_responds() -> bool:
    try:
        proc = _run(["scontrol", "ping"], timeout_s=15)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0 and " is UP" in proc.stdout


def node_state() -> str | None:
    """The node's state as sinfo prints it (e.g. 'idle', 'down', 'drain'), None if sinfo fails."""
    try:
        proc = _run(["sinfo", "--noheader", "--nodes", NODE_NAME, "--format", "%t"], timeout_s=15)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    return proc.stdout.split()[0].rstrip("*~#!%$@^-")


def _slurmd_running() -> bool:
    """A slurmd process exists (the controller may not have heard from it yet)."""
    for proc_dir in Path("/proc").iterdir():
        if proc_dir.name.isdigit():
            try:
                # /proc/PID/stat: "pid (comm) state ..."; a zombie (Z) left by a container's init
                # that does not reap is not a running slurmd.
                comm, _, rest = Path(proc_dir, "stat").read_text().partition(") ")
                if comm.endswith("(slurmd") and not rest.startswith(("Z", "X")):
                    return True
            except OSError:
                continue
    return False


# ----------------------------------------------------------------------------------------------- daemons


def _start_daemon(name: str, argv: list[str], user: str | None = None) -> StartedDaemon:
    """Start a daemon in the foreground mode of its own session: the pid we hold is the daemon itself,
    and it outlives this process (so .ci/start_slurm.sh can return)."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"{name}.stdout.log"
    # Drop to `user` in the child itself (not through runuser/su, which would stay in between as the
    # parent and make the pid we record not the daemon's).
    as_user = {"user": user, "group": user, "extra_groups": []} if user and _is_root() else {}
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            **as_user,
        )
    _CHILDREN[proc.pid] = proc
    LOG.info("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
    return StartedDaemon(name=name, pid=proc.pid, argv=argv, log_path=str(log_path))


def _wait_for(condition, what: str, timeout_s: float, daemon: StartedDaemon | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        if daemon is not None and not _is_same_process(daemon):
            timeout_s = time.monotonic() - (deadline - timeout_s)
            what += f" ({daemon.name} exited)"
            break
        time.sleep(0.3)
    log_hint = ""
    if daemon is not None:
        log_hint = f"; see {daemon.log_path}"
        try:
            log_hint += ":\n" + Path(daemon.log_path).read_text(errors="replace")[-2000:]
        except OSError:
            pass
    raise SlurmUnavailable(f"{what} within {timeout_s:.1f} s{log_hint}")


def _start_munged(started: list[StartedDaemon]) -> None:
    if munge_works():
        return
    run_dir = Path("/run/munge")
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.chown(run_dir, "munge", "munge")
    if not Path("/etc/munge/munge.key").is_file():
        # Debian's munge package creates the key at install; recreate it if someone removed it.
        _run(["mungekey", "--create", "--force"], check=True)
        shutil.chown("/etc/munge/munge.key", "munge", "munge")
    daemon = _start_daemon("munged", ["/usr/sbin/munged", "--foreground"], user="munge")
    started.append(daemon)
    _wait_for(munge_works, "munged did not answer `munge -n | unmunge`", 20, daemon)


def _start_slurmctld(started: list[StartedDaemon]) -> None:
    if controller_responds():
        return
    daemon = _start_daemon("slurmctld", ["/usr/sbin/slurmctld", "-D", "-i"])
    started.append(daemon)
    _wait_for(controller_responds, "slurmctld did not answer `scontrol ping`", 30, daemon)


def _start_slurmd(started: list[StartedDaemon]) -> None:
    if _slurmd_running():
        return
    # -N: the node name in slurm.conf is 'localhost' whatever this machine's hostname is.
    daemon = _start_daemon("slurmd", ["/usr/sbin/slurmd", "-D", "-N", NODE_NAME])
    started.append(daemon)


def ensure_cluster(timeout_s: float = 60) -> SlurmCluster:
    """Return a usable one-node cluster, installing and starting only what is missing.

    Raises SlurmUnavailable (with the reason and the daemon's log) when it cannot."""
    if not sys.platform.startswith("linux"):
        raise SlurmUnavailable(f"the one-node test cluster needs Linux, not {sys.platform}")
    # Cheapest checks first: sinfo spends 9 s retrying when no controller runs, scontrol ping does not.
    state = node_state() if munge_works() and controller_responds() else None
    if state in USABLE_NODE_STATES:
        cpus, memory_mb = _declared_node_resources()
        LOG.info("reusing the running SLURM cluster (node %s is %s)", NODE_NAME, state)
        return SlurmCluster(NODE_NAME, DEFAULT_PARTITION, cpus, memory_mb)
    if not _is_root():
        raise SlurmUnavailable("no SLURM cluster is running and starting one needs root (run .ci/start_slurm.sh)")
    install_slurm()
    cpus, memory_mb = node_resources()
    conf_changed = write_slurm_conf(cpus, memory_mb)
    started: list[StartedDaemon] = []
    try:
        _start_munged(started)
        if conf_changed and controller_responds():
            # A controller that runs with an older config of ours: make it and slurmd re-read it.
            _run(["scontrol", "reconfigure"], timeout_s=30)
        _start_slurmctld(started)
        _start_slurmd(started)
        slurmd = next((daemon for daemon in started if daemon.name == "slurmd"), None)
        _wait_for(
            lambda: node_state() in USABLE_NODE_STATES | {"down", "drain", "drng"},
            f"node {NODE_NAME} did not register with slurmctld",
            timeout_s,
            slurmd,
        )
        if node_state() in {"down", "drain", "drng"}:
            # Left down/drained by an earlier run (e.g. a killed slurmd): the node is fine now.
            _run(["scontrol", "update", f"NodeName={NODE_NAME}", "State=RESUME"], timeout_s=15)
        _wait_for(
            lambda: node_state() in USABLE_NODE_STATES,
            f"node {NODE_NAME} did not become idle (sinfo state: {node_state()})",
            timeout_s,
            slurmd,
        )
    except BaseException:
        stop_daemons(started)
        raise
    finally:
        _save_state(_load_state() + started)
    LOG.info(
        "SLURM cluster ready: node %s, %d CPUs, %d MB; started %s",
        NODE_NAME,
        cpus,
        memory_mb,
        [daemon.name for daemon in started] or "nothing",
    )
    return SlurmCluster(NODE_NAME, DEFAULT_PARTITION, cpus, memory_mb, started)


def _declared_node_resources() -> tuple[int, int]:
    """CPUs and RealMemory of the node as the running controller knows them."""
    proc = _run(["scontrol", "show", "node", NODE_NAME, "--oneliner"], timeout_s=15)
    values = dict(token.partition("=")[::2] for token in proc.stdout.split() if "=" in token)
    return int(values.get("CPUTot", os.cpu_count() or 1)), int(values.get("RealMemory", 1024))


def stop_daemons(daemons: list[StartedDaemon], timeout_s: float = 15) -> None:
    """SIGTERM exactly these daemons (slurmd, slurmctld, munged order), SIGKILL after timeout_s."""
    order = {"slurmd": 0, "slurmctld": 1, "munged": 2}
    for daemon in sorted(daemons, key=lambda d: order.get(d.name, 9)):
        if not _is_same_process(daemon):
            continue
        LOG.info("stopping %s (pid %d)", daemon.name, daemon.pid)
        try:
            os.kill(daemon.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + timeout_s
        while _is_same_process(daemon) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _is_same_process(daemon):
            LOG.warning("%s (pid %d) ignored SIGTERM; killing it", daemon.name, daemon.pid)
            os.kill(daemon.pid, signal.SIGKILL)
        _CHILDREN.pop(daemon.pid, None)
    remaining = [d for d in _load_state() if all(d.pid != s.pid for s in daemons)]
    if STATE_DIR.exists():
        _save_state(remaining)


def stop_cluster(cluster: SlurmCluster) -> None:
    """Stop the daemons that ensure_cluster() started for `cluster`; a reused cluster is left running."""
    stop_daemons(cluster.started)


def stop_recorded() -> list[str]:
    """Stop every daemon recorded in STATE_FILE (started by earlier `start` calls); their names."""
    daemons = _load_state()
    stop_daemons(daemons)
    return [daemon.name for daemon in daemons]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", nargs="?", default="start", choices=["start", "stop", "status"])
    parser.add_argument(
        "--install-only", action="store_true", help="only install slurm-wlm and munge when missing; start nothing"
    )
    parser.add_argument("--timeout-s", type=float, default=60, help="bounded wait for the node (default 60)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="slurm_cluster: %(message)s")
    if args.install_only:
        try:
            install_slurm()
        except SlurmUnavailable as error:
            LOG.error("%s", error)
            return 1
        LOG.info("slurm-wlm and munge are installed (%s)", shutil.which("sbatch"))
    elif args.action == "start":
        try:
            cluster = ensure_cluster(args.timeout_s)
        except SlurmUnavailable as error:
            LOG.error("%s", error)
            return 1
        print(json.dumps(asdict(cluster)))
    elif args.action == "stop":
        LOG.info("stopped: %s", stop_recorded() or f"nothing (no daemon recorded in {STATE_FILE})")
    else:
        state = node_state() if munge_works() and controller_responds() else None
        print(f"node {NODE_NAME}: {state or 'no answer'}; munge: {'ok' if munge_works() else 'down'}")
        return 0 if state in USABLE_NODE_STATES else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
