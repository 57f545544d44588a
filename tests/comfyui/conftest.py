"""A real ComfyUI server with this pack installed, for the tests in this folder.

Skipped unless $COMFYUI_DIR points at a ComfyUI checkout; $COMFYUI_PYTHON is the interpreter that runs it
(default: this one). Under CI=true a missing piece (ComfyUI, websocket-client, chromium) FAILS the test
instead: `.ci/run` provides all of them, so a skip there would only hide that these tests never ran.

The server runs on the CPU, offline, on a free loopback port, from a temporary base directory whose only
custom node is this repository (linked), so the user's ComfyUI install, models and outputs are never
touched. It is started once per session and stopped by its process id.

The client speaks ComfyUI's HTTP + websocket API as a headless user would: POST /prompt with a client id,
read the websocket until the prompt succeeds, fails or is interrupted, then GET /history and /view. Binary
frames are step previews (counted) and progress text (kept in order among the events, as `progress_text`).

Fixtures: `comfy_dir` (the checkout), `server` (the shared ComfyServer), `chromium` (the browser binary),
`websocket_client` (the websocket-client module). Module-level helpers (`comfyui_dir`, `missing`,
`free_port`, `ComfyServer`, `ROOT`, `PACK_DIR_NAME`, `BOOT_SECONDS`) serve tests that start a server of
their own.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "example_workflows" / "api"
PACK_DIR_NAME = "comfyui-bagel-mot"
BOOT_SECONDS = 180
PROGRESS_TEXT = 3  # ComfyUI's BinaryEventTypes.TEXT (protocol.py): a node's progress text


# Script lines that import this pack in ComfyUI's own Python as ComfyUI imports a custom node (by path,
# under a package name of its own); the script sets `pack` to the pack's folder, imports importlib.util, sys.
IMPORT_PACK = r"""
init = pack + "/__init__.py"
spec = importlib.util.spec_from_file_location("bagel_pack", init, submodule_search_locations=[pack])
module = importlib.util.module_from_spec(spec)
sys.modules["bagel_pack"] = module
spec.loader.exec_module(module)
lib = module.bagel_model
"""


def workflow(name: str) -> dict:
    """The example workflow `name` in API format (example_workflows/api), as a prompt to queue."""
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def in_ci() -> bool:
    """Whether this is a CI run ($CI set, as CI services and `.ci/run` do), where nothing may skip."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(what: str) -> NoReturn:
    """Skip a test whose environment is absent, or fail it under CI, saying what to provide."""
    if in_ci():
        pytest.fail(
            f"{what} (CI=true: the real-ComfyUI tests must run here, not skip; `.ci/run` sets them up)"
        )
    pytest.skip(what)


def comfyui_dir() -> Path:
    """$COMFYUI_DIR, checked: the ComfyUI checkout the server runs from."""
    value = os.environ.get("COMFYUI_DIR")
    if not value:
        missing("set COMFYUI_DIR to a ComfyUI checkout (and COMFYUI_PYTHON to its interpreter) to run")
    path = Path(value)
    if not (path / "main.py").is_file():
        pytest.fail(f"COMFYUI_DIR={path} has no main.py")
    return path


def websocket_module() -> ModuleType:
    """The websocket-client package (ComfyUI's progress events, Chromium's DevTools protocol)."""
    try:
        import websocket
    except ImportError:
        missing("pip install websocket-client into the Python that runs these tests")
    return websocket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Run:
    """One executed prompt: how it ended, every websocket event for it, its history entry, its duration."""

    prompt_id: str
    status: str  # execution_success | execution_error | execution_interrupted
    events: list[dict]  # with {"type": "progress_text", "data": {"node", "text"}} for each text frame
    history: dict
    seconds: float
    previews: int = 0  # binary websocket frames: step previews

    def event(self, kind: str) -> dict:
        return next(e["data"] for e in self.events if e["type"] == kind)

    @property
    def cached(self) -> set[str]:
        return {n for e in self.events if e["type"] == "execution_cached" for n in e["data"]["nodes"]}


@dataclass
class ComfyServer:
    url: str
    log: Path
    process: subprocess.Popen
    base: Path
    pack: str = PACK_DIR_NAME  # ComfyUI names a pack after its folder (/extensions/<pack>/, templates)
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=60) as response:
            return response.read()

    def get_json(self, path: str):
        return json.loads(self.get(path))

    def post(self, path: str, body: object) -> bytes:
        request = urllib.request.Request(
            self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read()

    def free(self) -> None:
        """Unload models and drop cached node outputs, so the next prompt runs from scratch."""
        self.post("/free", {"unload_models": True, "free_memory": True})
        time.sleep(1.0)  # the prompt worker applies the flags between prompts

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def run(self, prompt: dict, on_event: Callable[[dict], None] | None = None, timeout: float = 600) -> Run:
        """Queue `prompt` (API format) and follow it to its end over the websocket."""
        ws = websocket_module().create_connection(
            self.url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}", timeout=timeout
        )
        try:
            start = time.monotonic()
            answer = json.loads(self.post("/prompt", {"prompt": prompt, "client_id": self.client_id}))
            prompt_id, events, previews = answer["prompt_id"], [], 0
            while True:
                message = ws.recv()
                if isinstance(message, bytes):
                    text = progress_text(message)
                    if text is None:  # a step preview
                        previews += 1
                    else:
                        events.append({"type": "progress_text", "data": text})
                    continue
                event = json.loads(message)
                if event.get("data", {}).get("prompt_id") != prompt_id:
                    continue
                events.append(event)
                if on_event is not None:
                    on_event(event)
                if event["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                    break
            seconds = time.monotonic() - start
        finally:
            ws.close()
        return Run(prompt_id, event["type"], events, self.history(prompt_id), seconds, previews)

    def history(self, prompt_id: str, wait: float = 30) -> dict:
        """The history entry of a prompt; the server writes it just after the websocket says it ended."""
        deadline = time.monotonic() + wait
        while True:
            found = self.get_json(f"/history/{prompt_id}")
            if prompt_id in found or time.monotonic() > deadline:
                return found[prompt_id]
            time.sleep(0.05)

    def images(self, run: Run, node_id: str) -> list[Image.Image]:
        """The images an output node of `run` saved or previewed, fetched through /view."""
        found = []
        for item in run.history["outputs"][node_id]["images"]:
            query = urllib.parse.urlencode({k: item[k] for k in ("filename", "subfolder", "type")})
            found.append(Image.open(io.BytesIO(self.get(f"/view?{query}"))).convert("RGB"))
        return found


def progress_text(message: bytes) -> dict | None:
    """A binary websocket frame as ComfyUI's `send_progress_text` packs it ({"node", "text"}: the event
    type, the node id's length, the node id, the text, big-endian), or None for any other frame."""
    (kind,) = struct.unpack(">I", message[:4])
    if kind != PROGRESS_TEXT:
        return None
    (size,) = struct.unpack(">I", message[4:8])
    return {"node": message[8 : 8 + size].decode(), "text": message[8 + size :].decode()}


def _start(comfy: Path, base: Path, log: Path, extra: tuple[str, ...] = ()) -> ComfyServer:
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / PACK_DIR_NAME).symlink_to(ROOT, target_is_directory=True)
    port = free_port()
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    command = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port)]
    command += [
        "--preview-method",  # previews as a user who turned them on sees them
        "auto",
        "--disable-auto-launch",
        "--base-directory",
        str(base),
        "--database-url",
        "sqlite:///:memory:",
        *extra,
    ]
    # Offline, and one thread: the tiny bundled model is fastest single-threaded on a small shared CPU.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=comfy, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = ComfyServer(f"http://127.0.0.1:{port}", log, process, base)
    deadline = time.monotonic() + BOOT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"ComfyUI exited with {process.returncode}:\n{server.log_text()[-3000:]}")
        try:
            server.get("/system_stats")
            return server
        except OSError:
            time.sleep(0.5)
    process.kill()
    pytest.fail(f"ComfyUI did not answer within {BOOT_SECONDS} s:\n{server.log_text()[-3000:]}")


@pytest.fixture(scope="session")
def comfy_dir() -> Path:
    return comfyui_dir()


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium binary the frontend tests drive: $CHROMIUM, or Debian's `chromium` on the PATH."""
    binary = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if not binary:
        missing("no chromium (apt-get install chromium, or set $CHROMIUM)")
    return binary


@pytest.fixture(scope="session")
def websocket_client() -> ModuleType:
    """The websocket-client package, for tests that speak a websocket protocol themselves."""
    return websocket_module()


def _stop(started: ComfyServer) -> None:
    started.process.terminate()
    try:
        started.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        started.process.kill()


@pytest.fixture(scope="session")
def server(comfy_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("comfyui_base")
    started = _start(comfy_dir, base, base / "comfyui.log")
    yield started
    _stop(started)


CURRENT_FRONTEND = "1.53.6"  # what ComfyUI 0.38.1 pins (requirements.txt: comfyui-frontend-package)


@pytest.fixture(scope="session")
def current_frontend_server(comfy_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The pinned backend serving the frontend today's ComfyUI ships: $BAGEL_FRONTEND_ROOT is the static
    folder of PyPI's comfyui-frontend-package (`.ci/run` installs it), given to ComfyUI's
    --front-end-root."""
    root = os.environ.get("BAGEL_FRONTEND_ROOT")
    if not root or not Path(root, "index.html").is_file():
        missing(
            f"set BAGEL_FRONTEND_ROOT to the static folder of comfyui-frontend-package=={CURRENT_FRONTEND} "
            "(pip install --target DIR; DIR/comfyui_frontend_package/static)"
        )
    base = tmp_path_factory.mktemp("comfyui_current_frontend")
    started = _start(comfy_dir, base, base / "comfyui.log", ("--front-end-root", root))
    yield started
    _stop(started)
