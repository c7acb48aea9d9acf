"""docker-compose.yml, .env.example and the Dockerfile checked against the code: the services and
what they wait for, the shared artifact volume, GPU reservations, and every variable against the
settings the code reads. (No Docker daemon runs here or in CI: this is what can be checked without
starting containers.)"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from urllib.parse import urlparse

import yaml

from core.settings import Settings

REPO = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SETTINGS = {name.upper() for name in Settings.model_fields}
APP_SERVICES = {"migrate", "serving", "runner", "bot"}


def _env_example() -> dict[str, str]:
    found = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        match = re.match(
            r"^#?\s*(?:\(set by docker-compose\.yml\)\s*)?([A-Z][A-Z0-9_]*)=(.*)$", line
        )
        if match:
            found[match.group(1)] = match.group(2)
    return found


def _compose_variables() -> set[str]:
    return set(re.findall(r"\$\{([A-Z0-9_]+)", (REPO / "docker-compose.yml").read_text()))


def test_services_wait_for_what_they_need() -> None:
    services = COMPOSE["services"]
    assert set(services) == {"postgres", *APP_SERVICES}
    postgres = services["postgres"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert services["migrate"]["command"] == ["python", "-m", "storage", "migrate"]
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("serving", "runner", "bot"):
        assert services[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }, name
    assert services["bot"]["depends_on"]["serving"] == {"condition": "service_healthy"}
    health = " ".join(services["serving"]["healthcheck"]["test"])
    port = services["serving"]["command"][services["serving"]["command"].index("--port") + 1]
    assert f"127.0.0.1:{port}/healthz" in health


def test_app_services_run_our_modules_share_one_artifact_volume_and_gpus_where_needed() -> None:
    services = COMPOSE["services"]
    for name in APP_SERVICES:
        service = services[name]
        command = service["command"]
        assert command[:2] == ["python", "-m"] and importlib.util.find_spec(command[2]), name
        artifact_dir = service["environment"]["ARTIFACT_DIR"]
        assert f"artifacts:{artifact_dir}" in service["volumes"], name
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
        gpus = devices.get("devices", [])
        wants_gpu = name in ("serving", "runner")
        assert bool(gpus) == wants_gpu, name
        for device in gpus:
            assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert set(COMPOSE["volumes"]) == {"artifacts", "pgdata"}
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]


def test_every_variable_is_one_the_code_or_the_compose_file_reads() -> None:
    services = COMPOSE["services"]
    compose_vars = _compose_variables()
    for name in APP_SERVICES:
        environment = services[name]["environment"]
        assert set(environment) <= SETTINGS, name
        url = urlparse(re.sub(r"\$\{[^}]*\}", "secret", environment["DATABASE_URL"]))
        assert url.scheme == "postgresql+psycopg" and url.hostname == "postgres"
        assert url.path == "/" + services["postgres"]["environment"]["POSTGRES_DB"]
        serving = urlparse(environment["SERVING_URL"])
        command = services["serving"]["command"]
        assert serving.hostname == "serving"
        assert serving.port == int(command[command.index("--port") + 1])
        assert services[name]["env_file"] == ".env"
    example = _env_example()
    assert set(example) >= SETTINGS, SETTINGS - set(example)  # every setting documented
    assert compose_vars <= set(example), compose_vars - set(example)
    unknown = set(example) - SETTINGS - compose_vars - {"LOG_FORMAT"}
    assert not unknown, unknown
    # The secrets ship empty: nothing to leak, and placeholders would be refused anyway.
    for secret in (
        "SLACK_BOT_TOKEN",
        "SLACK_SIGNING_SECRET",
        "SERVING_API_KEY",
        "POSTGRES_PASSWORD",
    ):
        assert example[secret] == "", secret


def test_the_image_carries_every_package_the_services_import() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    packages = Settings.__module__.split(".")[0], "storage", "runner", "serving", "bot", "stack"
    for package in packages:
        assert f"COPY {package} {package}" in dockerfile, package
    assert 'pip install --no-cache-dir ".[gpu]"' in dockerfile
    assert "USER finetune" in dockerfile
