"""ProxyConfig precedence: one rule, one test (environment > .env.local > .env > defaults)."""

from __future__ import annotations

from pathlib import Path

import pytest

from imageworks.chat_proxy.config import ConfigError, ProxyConfig


def write(path: Path, text: str) -> None:
    path.write_text(text)


def test_defaults_match_the_runbook(tmp_path: Path) -> None:
    config = ProxyConfig.load(environ={}, cwd=tmp_path)
    assert (config.host, config.port) == ("127.0.0.1", 8100)
    assert config.vllm_remote_url == "http://127.0.0.1:8600"
    assert config.ollama_base_url == "http://127.0.0.1:11434"
    assert config.autostart_enabled and config.require_template
    assert config.max_log_bytes == 25_000_000
    assert config.log_path == Path("logs/chat_proxy.jsonl")
    assert config.staging_dir == Path("_staging")


def test_dot_env_overrides_defaults(tmp_path: Path) -> None:
    write(tmp_path / ".env", "CHAT_PROXY_PORT=9001\n")
    assert ProxyConfig.load(environ={}, cwd=tmp_path).port == 9001


def test_dot_env_local_overrides_dot_env(tmp_path: Path) -> None:
    write(tmp_path / ".env", "CHAT_PROXY_PORT=9001\nCHAT_PROXY_AUTOSTART_ENABLED=1\n")
    write(tmp_path / ".env.local", "CHAT_PROXY_AUTOSTART_ENABLED=0\n")
    config = ProxyConfig.load(environ={}, cwd=tmp_path)
    assert config.port == 9001 and config.autostart_enabled is False


def test_environment_overrides_both_files(tmp_path: Path) -> None:
    write(tmp_path / ".env", "CHAT_PROXY_PORT=9001\n")
    write(tmp_path / ".env.local", "CHAT_PROXY_PORT=9002\n")
    assert ProxyConfig.load(environ={"CHAT_PROXY_PORT": "9003"}, cwd=tmp_path).port == 9003


def test_explicit_overrides_win_over_the_environment(tmp_path: Path) -> None:
    config = ProxyConfig.load(environ={"CHAT_PROXY_PORT": "9003"}, cwd=tmp_path, port=9004)
    assert config.port == 9004


def test_shared_imageworks_dirs_are_used_unless_the_proxy_sets_its_own(tmp_path: Path) -> None:
    environ = {"IMAGEWORKS_REGISTRY_DIR": "/r", "IMAGEWORKS_STAGING_DIR": "/s"}
    config = ProxyConfig.load(environ=environ, cwd=tmp_path)
    assert (config.registry_dir, config.staging_dir) == (Path("/r"), Path("/s"))
    environ["CHAT_PROXY_REGISTRY_DIR"] = "/own"
    assert ProxyConfig.load(environ=environ, cwd=tmp_path).registry_dir == Path("/own")


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("CHAT_PROXY_PORT", "eighty", "valid integer"),
        ("CHAT_PROXY_PORT", "70000", "less than or equal to 65535"),
        ("CHAT_PROXY_AUTOSTART_ENABLED", "maybe", "valid boolean"),
        ("CHAT_PROXY_VLLM_REMOTE_URL", "imageworks-vllm:8600", "http://"),
        ("CHAT_PROXY_VLLM_GPU_MEMORY_UTILIZATION", "1.5", "less than or equal to 1"),
        ("CHAT_PROXY_SERVER", "gunicorn", "hypercorn"),
        ("CHAT_PROXY_GPU_TOTAL_MB", "24000,0", "at least 1 MB"),
        ("CHAT_PROXY_GPU_TOTAL_MB", "24000,lots", "valid integer"),
        ("CHAT_PROXY_GPU_PROBE", "cuda", "'sim'"),
    ],
)
def test_a_bad_value_fails_naming_the_variable(
    tmp_path: Path, variable: str, value: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        ProxyConfig.load(environ={variable: value}, cwd=tmp_path)
    assert str(caught.value).startswith(f"{variable}: ") and reason in str(caught.value)


def test_binding_beyond_loopback_requires_an_admin_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="requires CHAT_PROXY_ADMIN_TOKEN"):
        ProxyConfig.load(environ={"CHAT_PROXY_HOST": "0.0.0.0"}, cwd=tmp_path)
    config = ProxyConfig.load(
        environ={"CHAT_PROXY_HOST": "0.0.0.0", "CHAT_PROXY_ADMIN_TOKEN": "s3cret"}, cwd=tmp_path
    )
    assert config.host == "0.0.0.0"
    assert ProxyConfig.load(environ={"CHAT_PROXY_HOST": "::1"}, cwd=tmp_path).host == "::1"


def test_api_keys_are_a_comma_separated_list(tmp_path: Path) -> None:
    config = ProxyConfig.load(environ={"CHAT_PROXY_API_KEYS": " a, b ,,c"}, cwd=tmp_path)
    assert config.api_keys == ("a", "b", "c")


def test_gpu_totals_are_one_per_device(tmp_path: Path) -> None:
    def totals(raw: str) -> tuple[int, ...] | None:
        return ProxyConfig.load(environ={"CHAT_PROXY_GPU_TOTAL_MB": raw}, cwd=tmp_path).gpu_total_mb

    assert totals("20000") == (20000,)  # one number: one device, as before
    assert totals("24000, 24000") == (24000, 24000)
    assert totals("") is None
    assert ProxyConfig.load(cwd=tmp_path, gpu_total_mb=20000).gpu_total_mb == (20000,)


def test_printing_shows_addresses_and_paths_but_never_secrets(tmp_path: Path) -> None:
    config = ProxyConfig.load(
        environ={"CHAT_PROXY_API_KEYS": "key-123", "CHAT_PROXY_ADMIN_TOKEN": "tok-456"},
        cwd=tmp_path,
    )
    shown = str(config)
    for expected in (
        "CHAT_PROXY_HOST=127.0.0.1",
        "CHAT_PROXY_PORT=8100",
        "CHAT_PROXY_VLLM_REMOTE_URL=http://127.0.0.1:8600",
        "CHAT_PROXY_OLLAMA_BASE_URL=http://127.0.0.1:11434",
        "CHAT_PROXY_LOG_PATH=logs/chat_proxy.jsonl",
        "CHAT_PROXY_ADMIN_TOKEN=<set>",
    ):
        assert expected in shown
    assert "key-123" not in shown + repr(config) and "tok-456" not in shown + repr(config)
    assert "tok-456" not in str(config.public())


def test_every_setting_is_documented() -> None:
    from imageworks.chat_proxy.config import DERIVED_FIELDS, env_name

    doc = (Path(__file__).resolve().parents[3] / "docs" / "configuration.md").read_text()
    settings = [f for f in ProxyConfig.model_fields if f not in DERIVED_FIELDS]
    missing = [env_name(f) for f in settings if f"`{env_name(f)}`" not in doc]
    assert not missing, f"settings missing from docs/configuration.md: {missing}"


def test_a_body_budget_below_three_bodies_is_refused_with_the_figures(tmp_path: Path) -> None:
    # An operator who raises the largest body (or lowers the budget) is told both values and
    # the least budget that would do, without pydantic's own words.
    with pytest.raises(ConfigError) as caught:
        ProxyConfig.load(environ={"CHAT_PROXY_MAX_BODY_BYTES": "100000000"}, cwd=tmp_path)
    message = str(caught.value)
    assert "CHAT_PROXY_BODY_BUDGET_BYTES is 268435456" in message, message
    assert "3 times CHAT_PROXY_MAX_BODY_BYTES (100000000): 300000000 or more" in message
    assert "Value error" not in message, message
    budget = {"CHAT_PROXY_MAX_BODY_BYTES": "100000000", "CHAT_PROXY_BODY_BUDGET_BYTES": "3e8"}
    with pytest.raises(ConfigError, match="CHAT_PROXY_BODY_BUDGET_BYTES: "):
        ProxyConfig.load(environ=budget, cwd=tmp_path)  # a number of bytes, in digits
    budget["CHAT_PROXY_BODY_BUDGET_BYTES"] = "300000000"
    assert ProxyConfig.load(environ=budget, cwd=tmp_path).body_budget_bytes == 300_000_000
