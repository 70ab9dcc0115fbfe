"""Launchers: where the ranks of a real run live.

* :class:`Local`: one process per rank on this machine, over loopback.
* :class:`EmulatedCluster`: one Linux network namespace per node of the
  cluster, each joined to a bridge by a veth pair whose two directions are
  shaped with ``tc tbf`` to the inter-node bandwidth; a node's ranks share its
  namespace (so they talk over its loopback, unshaped, like GPUs in one box).
  Needs root. Everything it makes has names unique to the run and is removed
  when the run ends, however it ends.
* :class:`Torchrun`: the ranks torchrun (or SLURM) started; :func:`realrun.run`
  then runs this process's rank (see the README for a command line).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from simulator.units import parse_bandwidth

_ROOT = str(Path(__file__).resolve().parent.parent)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(rank: int, world: int, addr: str, port: int, ifname: str, threads: int) -> dict:
    env = dict(os.environ)
    env.update(MASTER_ADDR=addr, MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
               LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME=ifname, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH", "")) if p))
    return env


def _popen(cmd: list[str], env: dict, folder: Path, rank: int) -> subprocess.Popen:
    out = (folder / f"rank{rank}.log").open("wb")
    try:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    finally:
        out.close()


def kill(procs) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


@dataclass(frozen=True)
class Local:
    """Every rank a process on this machine, rendezvous over loopback."""

    def start(self, experiment, folder: Path, threads: int) -> list[subprocess.Popen]:
        world = experiment.world_size
        port = _free_port()
        cmd = [sys.executable, "-m", "realrun.worker", str(folder)]
        return [_popen([*cmd, str(r)], worker_env(r, world, "127.0.0.1", port, "lo", threads), folder, r)
                for r in range(world)]

    def stop(self) -> None:
        pass

    def links(self, experiment, makespan: float):
        return None


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise OSError(f"{' '.join(cmd)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done


@dataclass
class EmulatedCluster:
    """Nodes as network namespaces on this machine, their links shaped by ``tc tbf``.

    ``bandwidth``: each node's link to the switch, both directions (a number in
    bytes/s or a string such as ``"200Mbps"``); ``None`` takes the experiment's
    inter-node link bandwidth.
    """

    bandwidth: float | str | None = None
    burst_seconds: float = 0.002
    """tbf bucket as seconds of the rate (at least two frames of :attr:`mtu`). A real link has
    no bucket: it never sends faster than its rate, so the shaper's bucket is the emulation's
    error, and a message that finds it full after an idle spell crosses up to that many
    seconds early. Too small a bucket loses rate instead: time the sending thread is not
    scheduled beyond the bucket's is lost to the link. Measured on the validation matrix
    (2-core machine, both cores computing beside the all-reduces): at 4 ms a lone message
    after 5 ms idle beat the rate by 175 KB's worth at 400 Mbit/s, and the pipelines, whose
    128 KB messages often found the bucket full, ran 20-50 % faster than a plain link
    gives; at 1 ms the 400 Mbit/s all-reduces moved 1.6 MB in 35 ms per iteration instead
    of the rate's 32 ms; at 2 ms, 32.5 ms. On a busy host timers fire late and a small bucket
    loses more rate: in one such spell a lone 20 MB message at 200 Mbit/s ran 3-14 % slow
    at 2 ms and 1.4-7.5 % at 3 ms (1.3-3.4 % at 2 or 4 ms once the host was quiet);
    calibration measures the rate the links give, so the calibrated model follows."""
    mtu: int = 9000
    """Frame size of the links: jumbo frames, as data-centre networks use, so TCP/IP headers take
    0.7 % of what tbf counts (4.4 % at 1500)."""

    def __post_init__(self) -> None:
        if self.bandwidth is not None:
            self.bandwidth = parse_bandwidth(self.bandwidth, field="EmulatedCluster.bandwidth")
            if not self.bandwidth > 0:
                raise ValueError(f"EmulatedCluster.bandwidth must be > 0, got {self.bandwidth!r}")
        if isinstance(self.mtu, bool) or not isinstance(self.mtu, int) or not 576 <= self.mtu <= 65535:
            raise ValueError(f"EmulatedCluster.mtu must be an integer in [576, 65535], got {self.mtu!r}")
        if not (isinstance(self.burst_seconds, int | float) and 0 < self.burst_seconds < 1):
            raise ValueError(f"EmulatedCluster.burst_seconds must be in (0, 1), got {self.burst_seconds!r}")
        self._made: list[tuple[str, str]] = []
        self._procs: list = []

    @staticmethod
    def check() -> None:
        if os.geteuid() != 0:
            raise PermissionError("EmulatedCluster needs root (it makes network namespaces, veth pairs and tc "
                                  "qdiscs); run as root, or use realrun.Local()")
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                raise OSError(f"EmulatedCluster needs the '{tool}' command (iproute2), which is not installed")

    def rate(self, experiment) -> float:
        return float(self.bandwidth if self.bandwidth is not None else experiment.cluster.inter.bandwidth)

    def bucket(self, rate: float) -> int:
        """Bytes of tbf's bucket on a link of ``rate`` bytes/s: :attr:`burst_seconds` of the
        rate, at least two frames (tbf never sends a frame larger than its bucket)."""
        return max(2 * self.mtu, int(rate * self.burst_seconds))

    def setup(self, nodes: int, rate: float) -> list[dict]:
        """Make the namespaces, the bridge and the shaped veths of ``nodes`` nodes."""
        self.check()
        rid = "cs" + secrets.token_hex(3)
        net = 10 + secrets.randbelow(240)
        self.run_id = rid
        bridge = f"{rid}br"
        self.nodes: list[dict] = []
        try:
            _run(["ip", "link", "add", bridge, "type", "bridge"])
            self._made.append(("link", bridge))
            _run(["ip", "link", "set", bridge, "mtu", str(self.mtu), "up"])
            bits = int(rate * 8)
            burst = self.bucket(rate)
            for i in range(nodes):
                ns, host_end, node_end = f"{rid}-n{i}", f"{rid}h{i}", f"{rid}n{i}"
                ip = f"10.{net}.{i // 250}.{i % 250 + 1}"
                _run(["ip", "netns", "add", ns])
                self._made.append(("netns", ns))
                _run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", node_end])
                self._made.append(("link", host_end))
                _run(["ip", "link", "set", node_end, "netns", ns])
                _run(["ip", "link", "set", host_end, "master", bridge])
                _run(["ip", "link", "set", host_end, "mtu", str(self.mtu), "up"])
                inside = ["ip", "netns", "exec", ns]
                _run([*inside, "ip", "addr", "add", f"{ip}/16", "dev", node_end])
                _run([*inside, "ip", "link", "set", "lo", "up"])
                _run([*inside, "ip", "link", "set", node_end, "mtu", str(self.mtu), "up"])
                shape = ["root", "tbf", "rate", f"{bits}bit", "burst", str(burst), "latency", "200ms"]
                _run([*inside, "tc", "qdisc", "add", "dev", node_end, *shape])  # out of the node
                _run(["tc", "qdisc", "add", "dev", host_end, *shape])  # into the node
                self.nodes.append({"ns": ns, "ip": ip, "ifname": node_end, "host_end": host_end})
        except BaseException:
            self.stop()
            raise
        return self.nodes

    def start(self, experiment, folder: Path, threads: int) -> list[subprocess.Popen]:
        cluster = experiment.run_cluster
        world = cluster.world_size
        node_of = [cluster.node_of(r) for r in range(world)]
        nodes = self.setup(max(node_of) + 1, self.rate(experiment))
        self._counters = {i: self._bytes(n["host_end"]) for i, n in enumerate(nodes)}
        master = nodes[node_of[0]]["ip"]
        port = 29500 + secrets.randbelow(20000)
        for r in range(world):
            node = nodes[node_of[r]]
            cmd = ["ip", "netns", "exec", node["ns"], sys.executable, "-m", "realrun.worker", str(folder), str(r)]
            self._procs.append(_popen(cmd, worker_env(r, world, master, port, node["ifname"], threads), folder, r))
        return list(self._procs)

    @staticmethod
    def _bytes(ifname: str) -> tuple[int, int]:
        base = Path("/sys/class/net") / ifname / "statistics"
        try:
            return int((base / "rx_bytes").read_text()), int((base / "tx_bytes").read_text())
        except OSError:
            return 0, 0

    def links(self, experiment, makespan: float):
        """Bytes each node sent and received over its shaped link during the run."""
        import pandas as pd

        rate = self.rate(experiment)
        rows = []
        for i, node in enumerate(getattr(self, "nodes", [])):
            rx0, tx0 = self._counters.get(i, (0, 0))
            rx, tx = self._bytes(node["host_end"])
            # The host end receives what the node sends, and transmits what it receives.
            for name, carried in ((f"node{i}/out", rx - rx0), (f"node{i}/in", tx - tx0)):
                rows.append((len(rows), name, rate, float(carried), float("nan"),
                             carried / (rate * makespan) if makespan > 0 else 0.0))
        return pd.DataFrame(rows, columns=["link", "name", "bandwidth", "bytes", "busy_time", "utilisation"])

    def stop(self) -> None:
        """Kill the run's processes and remove its namespaces, veths and bridge (idempotent)."""
        kill(self._procs)
        for kind, name in reversed(self._made):
            if kind == "netns":
                pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
                for pid in pids:
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (ProcessLookupError, ValueError):
                        pass
                _run(["ip", "netns", "del", name], check=False)
            else:
                _run(["ip", "link", "del", name], check=False)
        self._made.clear()
        self._procs = []


@dataclass(frozen=True)
class Torchrun:
    """The ranks torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``) or
    SLURM (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``) started; this process runs its own."""

    def identity(self) -> tuple[int, int, int]:
        env = os.environ
        if "RANK" in env and "WORLD_SIZE" in env:
            return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
                raise ValueError("Torchrun under SLURM needs MASTER_ADDR and MASTER_PORT set (the first node's "
                                 "address and a free port)")
            os.environ.setdefault("RANK", env["SLURM_PROCID"])
            os.environ.setdefault("WORLD_SIZE", env["SLURM_NTASKS"])
            return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        raise ValueError("Torchrun found neither torchrun's RANK/WORLD_SIZE nor SLURM's SLURM_PROCID/SLURM_NTASKS "
                         "in the environment; start the script with torchrun or srun")
