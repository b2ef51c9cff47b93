"""Supervision tried the way an attacker and a clumsy operator would (a reviewer's findings, each
reproduced here against real processes): forged engine records, an engine whose workers outlive
it, a proxy killed between spawn and record, wrapper launch templates, two proxies on one
staging dir, a model removed from the registry while it runs, a model someone else started on
the executor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import pytest

from testkit.entries import eventually
from testkit.processes import FAKE_ENGINE_TEMPLATE, Executor, our_processes, start_proxy
from testkit.servers import free_port

pytestmark = pytest.mark.subprocess
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
ENGINE = {"name": "fk", "backend": "llamacpp", "backend_config": {"model_path": "none"}}


def fake_template(*extra: str, wrapper: tuple[str, ...] = ()) -> list[str]:
    argv = json.loads(FAKE_ENGINE_TEMPLATE)
    argv[argv.index("{extra_args}") : argv.index("{extra_args}") + 1] = [
        "--flavour",
        "llamacpp",
        *extra,
    ]
    return [*wrapper, *argv]


def env_for(template: list[str], **more: str) -> dict[str, str]:
    return {"CHAT_PROXY_LLAMACPP_LAUNCH_TEMPLATE": json.dumps(template), **more}


def state_of(url: str, name: str) -> dict[str, Any]:
    models = httpx.get(url + "/admin/state", timeout=10).json()["models"]
    found: dict[str, Any] = next(m for m in models if m["name"] == name)
    return found


def fake_engines(root: Path) -> list[int]:
    """This test's fake engine processes: those whose working directory is ``root``."""
    found = []
    for pid, cmd in our_processes():
        if "fake_engine" in cmd:
            try:
                if Path(f"/proc/{pid}/cwd").readlink() == root:
                    found.append(pid)
            except OSError:
                continue
    return found


def record(root: Path, name: str) -> dict[str, Any]:
    path = root / "_staging" / "engines" / f"{urllib.parse.quote(name, safe='')}.json"
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def stop(proxy: subprocess.Popen[bytes]) -> int:
    proxy.send_signal(signal.SIGINT)
    proxy.communicate(timeout=60)
    return proxy.returncode


def test_a_forged_record_never_gets_a_stranger_signalled_or_adopted(tmp_path: Path) -> None:
    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        engines = tmp_path / "_staging" / "engines"
        engines.mkdir(parents=True)
        ticks = int(Path(f"/proc/{stranger.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        for name in ("fk", "not-in-the-registry"):  # every field copied from /proc, as a forger can
            (engines / f"{name}.json").write_text(
                json.dumps(
                    {
                        "pid": stranger.pid,
                        "start_ticks": ticks,
                        "argv": ["sleep", "300"],
                        "log_path": "",
                        "extra": {"model": name, "port": free_port()},
                    }
                )
            )
        proxy, url = start_proxy(tmp_path, [ENGINE], **env_for(fake_template()))
        assert state_of(url, "fk")["state"] == "stopped"  # not adopted
        assert stop(proxy) == 0
        assert stranger.poll() is None  # never signalled, at start or at shutdown
        assert not list(engines.glob("*.json"))
    finally:
        stranger.kill()
        stranger.wait()


def test_an_engines_workers_die_with_it_when_it_crashes(tmp_path: Path) -> None:
    # The engine starts a worker in its own process group, then the engine is killed -9.
    worker_marker = f"sleep {700 + os.getpid() % 200}"
    argv = fake_template()
    shell = " ".join(argv).replace("{python}", "exec {python}")
    template = ["sh", "-c", f"{worker_marker} & {shell}"]
    proxy, url = start_proxy(tmp_path, [ENGINE], **env_for(template))
    try:
        assert httpx.post(url + "/admin/activate", json={"model": "fk"}, timeout=60).is_success
        workers = [p for p, c in our_processes() if c == worker_marker]
        if not workers:  # our_processes looks for the project's programs: find the sleep
            workers = [
                int(e.name)
                for e in Path("/proc").iterdir()
                if e.name.isdigit()
                and (e / "cmdline").read_bytes().replace(b"\0", b" ").strip()
                == worker_marker.encode()
            ]
        assert len(workers) == 1
        os.kill(record(tmp_path, "fk")["pid"], signal.SIGKILL)
        assert eventually(lambda: state_of(url, "fk")["state"] == "crashed", 10)
        assert eventually(lambda: not Path(f"/proc/{workers[0]}").exists(), 20)
    finally:
        assert stop(proxy) == 0


def test_a_proxy_killed_between_spawn_and_record_leaves_no_engine(tmp_path: Path) -> None:
    # What a proxy killed right after the spawn leaves: a pending record and a live engine.
    template = fake_template()
    port = free_port()
    argv = [
        sys.executable if t == "{python}" else t.format(port=port, host="127.0.0.1")
        for t in template
    ]
    engines = tmp_path / "_staging" / "engines"
    engines.mkdir(parents=True)
    orphan = subprocess.Popen(argv, cwd=tmp_path, start_new_session=True)
    (engines / "fk.json").write_text(
        json.dumps(
            {
                "pid": 0,
                "start_ticks": None,
                "argv": argv,
                "log_path": "",
                "extra": {"model": "fk", "port": port},
            }
        )
    )
    proxy, url = start_proxy(tmp_path, [ENGINE], **env_for(template))
    try:
        assert orphan.wait(30) is not None  # the next proxy found it by its command and stopped it
        assert state_of(url, "fk")["state"] == "stopped"
    finally:
        if orphan.poll() is None:
            orphan.kill()
        assert stop(proxy) == 0


def test_an_engine_behind_a_wrapper_is_adopted_after_a_proxy_crash(tmp_path: Path) -> None:
    template = fake_template(wrapper=("/usr/bin/env",))
    proxy, url = start_proxy(tmp_path, [ENGINE], **env_for(template))
    assert httpx.post(url + "/admin/activate", json={"model": "fk"}, timeout=60).is_success
    pid = record(tmp_path, "fk")["pid"]
    proxy.send_signal(signal.SIGKILL)
    proxy.communicate(timeout=10)
    proxy, url = start_proxy(tmp_path, [ENGINE], **env_for(template))
    try:
        assert state_of(url, "fk")["state"] == "ready"
        assert fake_engines(tmp_path) == [pid]  # the same one, and only it
    finally:
        assert stop(proxy) == 0
    assert not fake_engines(tmp_path)


def test_a_second_proxy_on_the_same_staging_dir_refuses_to_start(tmp_path: Path) -> None:
    first, url = start_proxy(tmp_path, [ENGINE], **env_for(fake_template()))
    try:
        second = subprocess.run(
            [sys.executable, "-m", "imageworks.chat_proxy.cli", "--port", str(free_port())],
            cwd=tmp_path,
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("CHAT_PROXY_")},
                "CHAT_PROXY_GPU_PROBE": "none",
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode != 0
        assert "another chat proxy (pid " in second.stdout + second.stderr
        assert state_of(url, "fk")["state"] == "stopped"  # the first one is untouched
    finally:
        assert stop(first) == 0


def test_a_model_removed_from_the_registry_is_stopped_not_hidden(tmp_path: Path) -> None:
    proxy, url = start_proxy(
        tmp_path, [ENGINE], **env_for(fake_template(), CHAT_PROXY_RECONCILE_S="0.2")
    )
    try:
        assert httpx.post(url + "/admin/activate", json={"model": "fk"}, timeout=60).is_success
        assert fake_engines(tmp_path)
        (tmp_path / "configs" / "model_registry.curated.json").write_text("[]")
        assert eventually(lambda: not fake_engines(tmp_path), 20)
    finally:
        assert stop(proxy) == 0


def test_the_proxy_never_stops_a_model_someone_else_started_on_the_executor(
    tmp_path: Path, proxy_factory
) -> None:
    root = tmp_path / "exec"
    (root / "configs").mkdir(parents=True)
    entries = [
        {
            "name": name,
            "backend": "vllm",
            "backend_config": {"model_path": "/m"},
            "chat_template": {"source": "external", "path": "t.jinja"},
        }
        for name in ("v", "w")
    ]
    (root / "configs" / "model_registry.curated.json").write_text(json.dumps(entries))
    executor = Executor(root, template=FAKE_ENGINE_TEMPLATE)
    try:
        proxy = proxy_factory(entries, vllm_remote_url=executor.url, reconcile_s=0.2)
        assert proxy.client.post("/admin/activate", json={"model": "v"}, timeout=60).is_success
        httpx.post(executor.url + "/admin/activate", json={"model": "w"}, timeout=60)

        def v_state() -> str:
            return str(state_of(proxy.url, "v")["state"])

        assert eventually(lambda: v_state() == "crashed", 10)
        state = httpx.get(executor.url + "/admin/state").json()
        assert state["status"] == "running" and state["logical_name"] == "w"  # left alone
        proxy.server.stop()
    finally:
        assert executor.stop() == 0
