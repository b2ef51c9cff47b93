"""What a ``ray`` entry deploys and how the proxy's write keeps everyone else's applications
(pure functions; the real cluster is in tests/test_ray_backend.py)."""

from __future__ import annotations

from typing import Any

import pytest

from imageworks.chat_proxy.engines.backends import ray_apps
from imageworks.chat_proxy.errors import ModelStartFailed
from imageworks.model_loader.schema import ModelEntry


def entry(ray: dict[str, Any] | None, name: str = "m", **fields: Any) -> ModelEntry:
    return ModelEntry.model_validate({"name": name, "backend": "ray", "ray": ray, **fields})


def test_any_import_path_with_its_args_under_our_name_and_prefix() -> None:
    app = ray_apps.application(
        entry({"import_path": "pkg.mod:build", "args": {"x": 1}, "runtime_env": {"pip": ["a"]}})
    )
    assert app == {
        "name": "imageworks-m",
        "route_prefix": "/imageworks-m",
        "import_path": "pkg.mod:build",
        "args": {"x": 1},
        "runtime_env": {"pip": ["a"]},
    }


def test_an_llm_description_becomes_ray_serve_llms_openai_app() -> None:
    app = ray_apps.application(
        entry(
            {
                "llm": {
                    "model_source": "Qwen/Qwen2.5-7B-Instruct",
                    "accelerator_type": "H100",
                    "autoscaling_config": {"min_replicas": 1, "max_replicas": 4},
                    "engine_kwargs": {"max_model_len": 8192},
                    "lora_config": {"max_num_adapters_per_replica": 2},
                },
                "route_prefix": "/qwen",
            },
            name="qwen",
            served_model_id="qwen2.5-7b",
        )
    )
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    assert app["route_prefix"] == "/qwen"
    assert app["args"] == {
        "llm_configs": [
            {
                "model_loading_config": {
                    "model_id": "qwen2.5-7b",
                    "model_source": "Qwen/Qwen2.5-7B-Instruct",
                },
                "engine_kwargs": {"max_model_len": 8192},
                "accelerator_type": "H100",
                "deployment_config": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}},
                "lora_config": {"max_num_adapters_per_replica": 2},
            }
        ]
    }


@pytest.mark.parametrize(
    ("ray", "why"),
    [
        (None, "exactly one of"),
        ({"import_path": "a:b", "llm": {"model_source": "x"}}, "exactly one of"),
        ({"import_path": "not a path"}, "import_path"),
        ({"import_path": "a:b", "route_prefix": "no-slash"}, "route_prefix"),
        ({"import_path": "a:b", "surprise": 1}, "surprise"),
    ],
)
def test_a_bad_description_fails_the_start_naming_the_field(
    ray: dict[str, Any] | None, why: str
) -> None:
    with pytest.raises(ModelStartFailed, match=why):
        ray_apps.application(entry(ray))


def test_application_names_are_safe_and_distinct() -> None:
    assert ray_apps.app_name("gemma") == "imageworks-gemma"
    assert ray_apps.app_name("org/m") != ray_apps.app_name("org_m")
    assert ray_apps.app_name("org/m").startswith("imageworks-org_m-")


def status(apps: dict[str, dict[str, Any]], **top: Any) -> dict[str, Any]:
    return {
        "applications": {
            name: {"status": "RUNNING", "deployed_app_config": config}
            for name, config in apps.items()
        },
        **top,
    }


def test_a_write_keeps_everyone_elses_applications_and_serve_settings() -> None:
    theirs = {"name": "theirs", "route_prefix": "/t", "import_path": "t:app"}
    old = {"name": "imageworks-m", "route_prefix": "/imageworks-m", "import_path": "old:app"}
    sibling = {"name": "imageworks-n", "route_prefix": "/imageworks-n", "import_path": "n:app"}
    new = {**old, "import_path": "new:app"}
    current = status(
        {"theirs": theirs, "imageworks-m": old, "imageworks-n": sibling},
        http_options={"host": "0.0.0.0", "port": 8000, "root_path": "", "ssl_keyfile": None},
        proxy_location="EveryNode",
    )
    body = ray_apps.deploy_config(current, "imageworks-m", new, ("127.0.0.1", 9))
    assert body["applications"] == [new, sibling, theirs]
    assert body["http_options"] == {"host": "0.0.0.0", "port": 8000, "root_path": ""}
    assert body["proxy_location"] == "EveryNode"
    removed = ray_apps.deploy_config(current, "imageworks-m", None, ("127.0.0.1", 9))
    assert removed["applications"] == [sibling, theirs]


def test_the_write_that_starts_serve_asks_it_to_listen_where_requests_go() -> None:
    body = ray_apps.deploy_config({"applications": {}}, "imageworks-m", None, ("10.0.0.5", 8123))
    assert body == {"applications": [], "http_options": {"host": "10.0.0.5", "port": 8123}}


def test_only_our_applications_are_ever_written() -> None:
    with pytest.raises(ValueError, match="not an application this proxy owns"):
        ray_apps.deploy_config({"applications": {}}, "theirs", None, ("127.0.0.1", 9))


def test_rays_message_is_the_exception_line_of_its_traceback() -> None:
    message = 'Traceback (most recent call last):\n  File "x"\nModuleNotFoundError: No module x\n'
    assert ray_apps.ray_message({"message": message}) == "ModuleNotFoundError: No module x"
    assert ray_apps.ray_message({"message": "", "status": "UNHEALTHY"}) == "UNHEALTHY"


def test_deployments_are_passed_on_and_a_route_prefix_loses_its_trailing_slash() -> None:
    deployments = [{"name": "Model", "num_replicas": 2}]
    app = ray_apps.application(
        entry({"import_path": "a:b", "deployments": deployments, "route_prefix": "/x/"})
    )
    assert app["deployments"] == deployments and app["route_prefix"] == "/x"
    assert "args" not in app and "runtime_env" not in app
    root = ray_apps.application(entry({"import_path": "a:b", "route_prefix": "/"}))
    assert root["route_prefix"] == "/"


def test_a_write_keeps_the_clusters_target_capacity() -> None:
    body = ray_apps.deploy_config(
        status({}, target_capacity=50, http_options={"port": 8000}), "imageworks-m", None, ("h", 1)
    )
    assert body == {"applications": [], "http_options": {"port": 8000}, "target_capacity": 50}
    zero = ray_apps.deploy_config(status({}, target_capacity=0), "imageworks-m", None, ("h", 1))
    assert zero["target_capacity"] == 0  # 0 is a capacity, not an absent one


def test_rays_message_without_a_message_or_a_status() -> None:
    assert ray_apps.ray_message({}) == "no message"
