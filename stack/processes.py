"""The product's long-running processes on one machine: serving and the runner as child processes
of ``finetune-bot``, each in its own process group, logging under ``ARTIFACT_DIR/../logs``."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pydantic import SecretStr

from core.settings import Settings

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("stack")


class StackError(RuntimeError):
    pass


@dataclass
class Stack:
    settings: Settings  # what every process shares (database, artifacts, base model, serving)
    env: dict[str, str]
    logs: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, *args: str) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        out = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it open
        process = subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        self.processes[name] = process
        log.info("started %s (pid %d, log %s)", name, process.pid, self.logs / f"{name}.log")
        return process

    def tail(self, name: str, chars: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def wait_healthy(self, name: str, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        process = self.processes[name]
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise StackError(f"{name} exited (status {process.returncode}):\n{self.tail(name)}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise StackError(f"{name} was not healthy after {timeout:.0f} s:\n{self.tail(name)}")

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for name, process in self.processes.items():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in 30 s: killing it", name)
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def process_env(settings: Settings) -> dict[str, str]:
    """The environment a child process needs to share this process's database, artifacts and
    base model (settings given in code, not only through the environment)."""
    env = {
        **os.environ,
        "DATABASE_URL": settings.db_url,
        "ARTIFACT_DIR": str(settings.artifact_dir),
    }
    if settings.base_model:
        env["BASE_MODEL"] = settings.base_model
    if settings.approvers:
        env["APPROVERS"] = ",".join(settings.approvers)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_stack(settings: Settings, *, serving_timeout: float = 300) -> Stack:
    """Start serving (waiting until it answers /healthz) and a runner; returns the handle whose
    ``settings`` the bot must use (the serving URL and key they share)."""
    url = settings.serving_url.rstrip("/")
    key = (
        settings.serving_api_key.get_secret_value()
        if settings.serving_api_key
        else secrets.token_urlsafe(24)  # one machine: a key of its own, never printed
    )
    shared = settings.model_copy(update={"serving_url": url, "serving_api_key": SecretStr(key)})
    env = {**process_env(shared), "SERVING_URL": url, "SERVING_API_KEY": key}
    stack = Stack(shared, env, Path(settings.artifact_dir).parent / "logs")
    port = url.rsplit(":", 1)[1].split("/")[0]
    try:
        stack.start("serving", "-m", "serving", "--port", port)
        stack.start("runner", "-m", "runner")
        stack.wait_healthy("serving", f"{url}/healthz", serving_timeout)
    except BaseException:
        stack.stop()
        raise
    log.info("serving answers on %s; the runner polls the queue", url)
    return stack
