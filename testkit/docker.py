"""A Docker engine of the test's own: dockerd started by PID with its own data and exec roots,
leaving the host's firewall, forwarding and interfaces as they were, and stopped again.

dockerd runs with ``--iptables=false --ip-forward=false --bridge=none``: it never touches the
firewall or turns on forwarding, and has no default bridge. Compose still makes the project's
own bridge network (containers reach each other by name, published ports go through
docker-proxy on 127.0.0.1); builds use the host's network. Its networks come from
``DEFAULT_POOL``, so no address of the stack is in a range the host uses.

The data root is a cache (``IMAGEWORKS_DOCKER_CACHE``, default /var/cache/imageworks-docker):
the base image and the build layers stay there for the next run on the same machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CACHE = Path(os.environ.get("IMAGEWORKS_DOCKER_CACHE", "/var/cache/imageworks-docker"))
DEFAULT_POOL = "base=10.233.0.0/16,size=24"
POOL_PREFIX = "10.233."


class DockerUnavailable(Exception):
    """dockerd is not installed, or cannot start here (not root, no kernel support)."""


def host_network_state() -> dict[str, str]:
    """What dockerd must leave as it found it: forwarding, the FORWARD chain, the interfaces."""
    state = {"ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()}
    if shutil.which("iptables"):
        listed = subprocess.run(
            ["iptables", "-S", "FORWARD"], capture_output=True, text=True, check=False
        )
        state["iptables FORWARD"] = listed.stdout + listed.stderr
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    state["interfaces"] = " ".join(
        sorted(line.split(":")[1].strip().split("@")[0] for line in links.stdout.splitlines())
    )
    return state


@dataclass
class Dockerd:
    process: subprocess.Popen[bytes]
    exec_root: Path
    log: Path
    before: dict[str, str] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return f"unix://{self.exec_root}/docker.sock"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env.update({"DOCKER_HOST": self.host, **extra})
        return env

    def docker(self, *args: str, timeout: float = 120) -> str:
        result = subprocess.run(
            ["docker", *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert result.returncode == 0, f"docker {' '.join(args)}: {result.stderr}"
        return result.stdout

    def leftovers(self) -> list[str]:
        """Processes of this engine still alive (dockerd, containerd, shims, docker-proxy)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
            except OSError:
                continue
            ours = str(self.exec_root) in cmd or ("docker-proxy" in cmd and POOL_PREFIX in cmd)
            if state != "Z" and ours:
                found.append(f"{entry.name}: {cmd.strip()}")
        return found

    def clear(self) -> None:
        """Remove every container and network of this engine (its data root is ours alone): a
        network left behind would leave its bridge interface on the host after the engine."""
        if self.process.poll() is not None:
            return
        if containers := self.docker("ps", "-aq").split():
            self.docker("rm", "-f", *containers)
        self.docker("network", "prune", "-f")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        deadline = time.monotonic() + 20
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.2)
        # dockerd leaves its bind mount of the host's network namespace (netns/default) in the
        # exec root when it exits: unmount what is ours, then the folder goes.
        for mount in reversed(self.mounts()):
            subprocess.run(["umount", mount], capture_output=True, check=False)
        if not self.mounts():
            shutil.rmtree(self.exec_root, ignore_errors=True)

    def mounts(self) -> list[str]:
        """Mount points under this engine's exec root (none once it is stopped and cleaned)."""
        prefix = f"{self.exec_root}/"
        points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        return [point for point in points if point.startswith(prefix)]


def start_dockerd() -> Dockerd:
    """Start an engine of our own, or raise DockerUnavailable with the reason."""
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise DockerUnavailable("dockerd is not installed (Debian: apt-get install docker.io)")
    if os.geteuid() != 0:
        raise DockerUnavailable("dockerd needs root here (no rootless setup)")
    before = host_network_state()
    data_root = CACHE / "data"
    data_root.mkdir(parents=True, exist_ok=True)
    # The exec root holds the API socket: a short path under /tmp (a socket path is limited).
    exec_root = Path(tempfile.mkdtemp(prefix="iw-dockerd-", dir="/tmp"))
    log = exec_root / "dockerd.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                dockerd,
                f"--data-root={data_root}",
                f"--exec-root={exec_root}",
                f"--pidfile={exec_root}/dockerd.pid",
                f"--host=unix://{exec_root}/docker.sock",
                "--iptables=false",
                "--ip-forward=false",
                "--ip-masq=false",
                "--bridge=none",
                f"--default-address-pool={DEFAULT_POOL}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    engine = Dockerd(process, exec_root, log, before)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            reason = log.read_text(errors="replace")[-2000:]
            raise DockerUnavailable(f"dockerd exited with {process.returncode}:\n{reason}")
        ready = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}}"],
            env=engine.env(),
            capture_output=True,
            check=False,
        )
        if ready.returncode == 0:
            return engine
        time.sleep(0.5)
    engine.stop()
    raise DockerUnavailable("dockerd did not answer within 60 s:\n" + log.read_text()[-2000:])
