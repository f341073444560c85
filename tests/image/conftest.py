"""Image tests: the built container image under the real Lambda RIE, and as an HTTP server.

They run only when COLDSTART_IMAGE names a built image (`make image-test` sets it, after
`make image`), so a plain `make test` skips them. Figures they measure are printed at the end.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bench import common
from bench.common import INVOKE_PATH, free_port

ROOT = Path(__file__).resolve().parents[2]
EVENTS_DIR = ROOT / "events"
FIRST_EVENT = "function-url-chat.json"
IMAGE = os.environ.get("COLDSTART_IMAGE", "")
ENGINE = os.environ.get("COLDSTART_ENGINE") or "podman"
RIE = Path(os.environ.get("COLDSTART_RIE") or common.RIE)  # make image-test passes the venv's
READY_TIMEOUT_S = 60.0
INVOKE_TIMEOUT_S = 180.0
FIGURES: dict[str, str] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "image: needs a built container image (make image-test)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.image)
            if not IMAGE:
                item.add_marker(pytest.mark.skip(reason="no image: run `make image-test`"))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("image figures")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")


def engine(*args: str, check: bool = True, timeout: float = 120) -> str:
    """Run the container engine; returns stdout, raises with stderr on failure."""
    done = subprocess.run(
        [ENGINE, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{ENGINE} {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def load_event(name: str) -> Any:
    """An event from events/ (tests never inline events)."""
    return json.loads((EVENTS_DIR / name).read_text())


@dataclass
class Container:
    """One running container, published on 127.0.0.1 only; removed by `remove()`."""

    name: str
    port: int
    started: float = field(default_factory=time.monotonic)
    first: tuple[int, dict[str, str], bytes] | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def running(self) -> bool:
        out = engine("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return out.strip() == "true"

    def logs(self) -> str:
        done = subprocess.run(
            [ENGINE, "logs", self.name], capture_output=True, text=True, timeout=30, check=False
        )
        return done.stdout + done.stderr

    def remove(self) -> None:
        engine("rm", "-f", self.name, check=False, timeout=60)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_http(self, path: str, want: set[int] | None = None) -> int:
        """Poll `path` until it answers (with a status in `want`, when given); returns the status.

        Fails at once if the container exits, and after READY_TIMEOUT_S otherwise.
        """
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            status = None
            try:
                with urllib.request.urlopen(self.url(path), timeout=2) as resp:
                    status = resp.status
            except urllib.error.HTTPError as exc:
                status = exc.code
            except (OSError, urllib.error.URLError):
                pass  # not listening yet, or the port proxy reset the connection
            if status is not None and (want is None or status in want):
                return status
            if not self.running():
                pytest.fail(f"container {self.name} exited:\n{self.logs()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{path} not ready after {READY_TIMEOUT_S}s:\n{self.logs()[-4000:]}")
            time.sleep(0.02)

    def request(
        self, path: str, payload: Any = None, timeout: float = INVOKE_TIMEOUT_S
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request (POST when `payload` is given); status, headers, body."""
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url(path), data=data)
        req.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()


def start(
    command: list[str],
    *,
    entrypoint: str | None = None,
    mounts: list[str] = (),
    env: dict[str, str] | None = None,
) -> Container:
    """Start the image detached with `command`, read-only like Lambda, port 8080 on 127.0.0.1."""
    container = Container(name=f"coldstart-image-test-{uuid.uuid4().hex[:8]}", port=free_port())
    args = ["run", "-d", "--pull=never", "--name", container.name, "--read-only"]
    args += ["--tmpfs", "/tmp", "-p", f"127.0.0.1:{container.port}:8080"]
    for mount in mounts:
        args += ["-v", mount]
    for name, value in (env or {}).items():
        args += ["-e", f"{name}={value}"]
    if entrypoint:
        args += ["--entrypoint", entrypoint]
    container.started = time.monotonic()
    try:
        engine(*args, IMAGE, *command)
    except BaseException:
        container.remove()
        raise
    return container


def image_config() -> dict[str, Any]:
    """The image's config (User, Cmd, Env, ...)."""
    return json.loads(engine("image", "inspect", "--format", "{{json .Config}}", IMAGE))


def save_logs(container: Container, label: str) -> Path:
    """Keep the container's log under .cache/ (for CI artifacts and failures)."""
    out = ROOT / ".cache" / f"image-test-{label}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(container.logs())
    return out


@pytest.fixture(scope="session")
def config() -> dict[str, Any]:
    return image_config()


def start_under_rie(command: list[str], env: dict[str, str] | None = None) -> Container:
    """`command` under the real RIE, mounted read-only (never baked into the image)."""
    if not RIE.is_file():
        pytest.fail(f"no RIE binary at {RIE}: install the dev extras, or set COLDSTART_RIE")
    return start(
        command,
        entrypoint="/aws-lambda/aws-lambda-rie",
        mounts=[f"{RIE.resolve()}:/aws-lambda/aws-lambda-rie:ro"],
        env=env,
    )


@pytest.fixture(scope="session")
def lambda_container(config: dict[str, Any]) -> Iterator[Container]:
    """The image's own CMD under the real RIE, after its first response."""
    container = start_under_rie(config["Cmd"])
    try:
        container.wait_http("/")  # the RIE answers 404 on / as soon as it listens
        FIGURES["lambda: container start -> RIE listening"] = f"{container.elapsed():.2f} s"
        # The first invoke runs Lambda init (imports, model load) and then the request.
        container.first = container.request(INVOKE_PATH, load_event(FIRST_EVENT))
        FIGURES[f"lambda: container start -> first response ({FIRST_EVENT})"] = (
            f"{container.elapsed():.2f} s"
        )
        init = re.search(r"INIT REPORT\(durationMs: ([0-9.]+)", container.logs())
        if init:
            FIGURES["lambda: init inside the container (RIE INIT REPORT)"] = (
                f"{float(init.group(1)) / 1000:.2f} s"
            )
        yield container
    finally:
        save_logs(container, "lambda")
        container.remove()
