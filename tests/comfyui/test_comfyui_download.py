"""The Loader's download switch inside a real ComfyUI, against a network that accepts connections and never
answers: the run ends with an error that says what to do, Cancel (`POST /interrupt`) stops the download at
once, and in both cases the next queued workflow runs.

Needs $COMFYUI_DIR (see conftest.py); skipped otherwise, as in CI. This file starts its own server: the
shared one is offline (HF_HUB_OFFLINE=1), this one has HF_ENDPOINT at a local port that never answers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TIMEOUT = 20  # HF_HUB_ETAG_TIMEOUT of this server: how long a download waits for an answer
REPO = "someone/BAGEL-never"


def _conftest():
    """The shared conftest's server helpers (its module name is not importable under pytest)."""
    spec = importlib.util.spec_from_file_location("_bagel_comfyui_conftest", HERE / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


shared = _conftest()


@pytest.fixture(scope="module")
def silent_endpoint():
    """A local port that accepts connections (the kernel completes the handshake) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


@pytest.fixture(scope="module")
def online_server(silent_endpoint, tmp_path_factory):
    comfy = shared.comfyui_dir()
    base = tmp_path_factory.mktemp("comfyui_download")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / shared.PACK_DIR_NAME).symlink_to(shared.ROOT, target_is_directory=True)
    port = shared.free_port()
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    command = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port)]
    command += [
        "--disable-auto-launch",
        "--base-directory",
        str(base),
        "--database-url",
        "sqlite:///:memory:",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(
        HF_ENDPOINT=silent_endpoint,
        HF_HUB_ETAG_TIMEOUT=str(TIMEOUT),
        HF_HUB_DOWNLOAD_TIMEOUT=str(TIMEOUT),
        OMP_NUM_THREADS="1",
    )
    log = base / "comfyui.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=comfy, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = shared.ComfyServer(f"http://127.0.0.1:{port}", log, process, base)
    try:
        deadline = time.monotonic() + shared.BOOT_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {process.returncode}:\n{server.log_text()[-3000:]}")
            try:
                server.get("/system_stats")
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not answer within {shared.BOOT_SECONDS} s")
                time.sleep(0.5)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def downloading() -> tuple[dict, str]:
    """The text-to-image example with its Loader switched to download REPO; and the Loader's node id."""
    prompt = shared.workflow("text_to_image")
    (loader_id,) = [k for k, node in prompt.items() if node["class_type"] == "BAGELLoader"]
    prompt[loader_id]["inputs"].update(download_if_missing=True, repo_id=REPO)
    return prompt, loader_id


def fetch_processes(server) -> list[str]:
    """Download child processes still running for this server's model folder (Linux /proc)."""
    target = str(server.base / "models" / "bagel" / REPO.replace("/", "--"))
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if target.encode() in args:
            found.append(cmdline.parent.name)
    return found


def test_silent_network_ends_the_run_with_the_way_out_and_the_queue_goes_on(online_server):
    prompt, loader_id = downloading()
    run = online_server.run(prompt, timeout=300)
    assert run.status == "execution_error", json.dumps(run.events[-1])[:2000]
    error = run.event("execution_error")
    assert error["node_id"] == loader_id and error["node_type"] == "BAGELLoader"
    message = error["exception_message"]
    assert f"did not answer within {TIMEOUT} s" in message, message
    assert "turn download_if_missing off" in message and REPO.replace("/", "--") in message, message
    assert run.seconds < 180
    print(f"never-answering download: clear error after {run.seconds:.1f} s (timeout {TIMEOUT} s)")
    assert online_server.run(shared.workflow("text_to_image")).status == "execution_success"


def test_cancel_stops_a_download_at_once_and_the_queue_goes_on(online_server):
    prompt, loader_id = downloading()
    cancelled: dict = {}

    def on_event(event):
        if event["type"] == "executing" and event["data"].get("node") == loader_id and not cancelled:
            time.sleep(2)  # the download is under way (its child started, waiting on the silent server)
            cancelled["at"] = time.monotonic()
            online_server.post("/interrupt", {})

    run = online_server.run(prompt, on_event=on_event, timeout=300)
    latency = time.monotonic() - cancelled["at"]
    assert run.status == "execution_interrupted", json.dumps(run.events[-1])[:2000]
    assert latency < TIMEOUT / 2, latency  # stopped by the Cancel, not by the timeout
    if Path("/proc").is_dir():
        assert not fetch_processes(online_server)  # the download did not go on behind the queue
    print(f"cancelled download: run ended {latency:.2f} s after POST /interrupt")
    assert online_server.run(shared.workflow("text_to_image")).status == "execution_success"
