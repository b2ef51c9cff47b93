"""A client on another host, for real: a network namespace of the test's own joined to this
one by a veth pair with private addresses, removed afterwards. The proxy sees the client's
address as a LAN peer, so the per-request admin guard (auth.py) is exercised as it is on a
workstation whose proxy was bound beyond loopback. Needs CAP_NET_ADMIN (root in CI's
container); skips with the reason elsewhere."""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testkit.processes import proxy_env, start_proxy, write_registry
from testkit.servers import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.subprocess, pytest.mark.slow]

TOKEN = "lan-admin-" + secrets.token_hex(8)


@dataclass(frozen=True)
class Lan:
    namespace: str
    host_address: str  # this side of the veth pair: what the proxy binds to
    client_address: str  # the namespace's side: the "other host"

    def curl(self, url: str, *args: str) -> tuple[int, dict[str, object]]:
        """``curl`` run inside the namespace: the request leaves from the client address."""
        inside = ["ip", "netns", "exec", self.namespace]
        done = subprocess.run(
            [*inside, "curl", "-s", "-m", "20", "-w", "\n%{http_code}", *args, url],
            capture_output=True,
            text=True,
            timeout=30,
        )
        body, _, status = done.stdout.rpartition("\n")
        return int(status), json.loads(body) if body else {}


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


def _unused_subnet() -> ipaddress.IPv4Network:
    """A /30 in 10.231.0.0/16 that no interface on this machine is in."""
    taken = [
        ipaddress.ip_interface(a["local"] + "/" + str(a["prefixlen"])).network
        for link in json.loads(_ip("-j", "addr").stdout or "[]")
        for a in link.get("addr_info", [])
        if a.get("family") == "inet"
    ]
    for candidate in ipaddress.ip_network("10.231.0.0/16").subnets(new_prefix=30):
        if not any(candidate.overlaps(net) for net in taken):
            return candidate
    pytest.skip("no free private /30 for the test's veth pair")


@pytest.fixture(scope="module")
def lan() -> Iterator[Lan]:
    if shutil.which("ip") is None or shutil.which("curl") is None:
        pytest.skip("the LAN-client tests need the 'ip' and 'curl' commands")
    name = f"iwlan{os.getpid() % 100000}"
    outside, inside = f"{name}a", f"{name}b"
    created = _ip("netns", "add", name)
    if created.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {created.stderr.strip()}")
    try:
        subnet = _unused_subnet()
        host, client = (str(a) for a in list(subnet.hosts())[:2])
        for step in (
            ("link", "add", outside, "type", "veth", "peer", "name", inside),
            ("link", "set", inside, "netns", name),
            ("addr", "add", f"{host}/30", "dev", outside),
            ("link", "set", outside, "up"),
            ("netns", "exec", name, "ip", "addr", "add", f"{client}/30", "dev", inside),
            ("netns", "exec", name, "ip", "link", "set", inside, "up"),
        ):
            done = _ip(*step)
            if done.returncode != 0:
                pytest.skip(f"cannot set up the veth pair: ip {' '.join(step)}: {done.stderr}")
        yield Lan(name, host, client)
    finally:
        _ip("link", "del", outside)  # takes its peer in the namespace with it
        _ip("netns", "del", name)


def _wait_listening(host: str, port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            out, _ = process.communicate()
            raise AssertionError(f"the server exited early: {out.decode(errors='replace')}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()


def test_a_lan_client_reads_but_administers_only_with_the_token(lan: Lan, tmp_path: Path) -> None:
    proxy, url = start_proxy(
        tmp_path, [], CHAT_PROXY_HOST=lan.host_address, CHAT_PROXY_ADMIN_TOKEN=TOKEN
    )
    try:
        assert lan.host_address in url
        status, models = lan.curl(url + "/v1/models")
        assert status == 200 and models["object"] == "list"

        status, error = lan.curl(url + "/admin/autostart", "-X", "PUT", "-d", '{"enabled":false}')
        assert status == 401
        assert "admin token" in error["error"]["message"]  # type: ignore[index]

        # A forwarded-for header claiming loopback changes nothing: the socket's peer decides.
        status, _ = lan.curl(
            url + "/admin/autostart",
            "-X",
            "PUT",
            "-H",
            "X-Forwarded-For: 127.0.0.1",
            "-d",
            '{"enabled":false}',
        )
        assert status == 401

        status, body = lan.curl(
            url + "/admin/autostart",
            "-X",
            "PUT",
            "-H",
            f"Authorization: Bearer {TOKEN}",
            "-H",
            "Content-Type: application/json",  # curl -d says form data otherwise: 415
            "-d",
            '{"enabled":false}',
        )
        assert (status, body) == (200, {"enabled": False})
    finally:
        _stop(proxy)


def test_an_app_served_beyond_loopback_by_plain_uvicorn_refuses_lan_admin(
    lan: Lan, tmp_path: Path
) -> None:
    """Our CLI refuses a non-loopback bind without an admin token; someone who runs the app
    with uvicorn directly gets past that check, so each request's peer is checked instead."""
    write_registry(tmp_path, [])
    port = free_port()
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "uvicorn", "--factory", "imageworks.chat_proxy.app:create_app"),
            *("--host", lan.host_address, "--port", str(port), "--log-level", "warning"),
        ],
        cwd=tmp_path,
        env=proxy_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_listening(lan.host_address, port, server)
        url = f"http://{lan.host_address}:{port}"
        status, error = lan.curl(url + "/admin/state")
        assert status == 401
        message = error["error"]["message"]  # type: ignore[index]
        assert lan.client_address in message and "CHAT_PROXY_ADMIN_TOKEN" in message
        status, lease = lan.curl(url + "/v1/gpu/lease", "-X", "POST", "-d", '{"owner":"x"}')
        assert status == 401, lease
        # Reading stays open, as on loopback (no API keys are configured).
        status, _ = lan.curl(url + "/v1/models")
        assert status == 200
    finally:
        _stop(server)
