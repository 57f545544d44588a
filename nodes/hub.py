"""Fetching a BAGEL model repo from Hugging Face for the Loader's download_if_missing switch.

The repo `owner/name` goes to `models/bagel/owner--name` (one folder per repo id, listed like any other
model), and only the files a load needs that are missing or unreadable there are fetched again.

A download runs in a child process that the node waits for while watching ComfyUI's Cancel: a stalled
connection cannot block the queue (every request has a timeout) and Cancel stops it at once (the child is
killed; the files it had finished stay, and the next run fetches the rest).

This is ComfyUI-side, not library code: it writes into ComfyUI's model folders, polls ComfyUI's Cancel,
and its messages speak in the Loader's inputs (download_if_missing, repo_id, model_name). The library
(`bagel_model.load`) only ever loads from a path; this module does not load anything.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from ..bagel_model.layout import (
    AE_FILE,
    CONFIG_FILES,
    INDEX_SUFFIX,
    OFFICIAL_FILES,
    CheckpointError,
    find_weights,
    read_header,
    read_index,
)
from . import comfy_bridge

OFFICIAL_REPO = "ByteDance-Seed/BAGEL-7B-MoT"
# Seconds a download request may wait for the server (connect, headers, each chunk of data); the user's
# HF_HUB_ETAG_TIMEOUT (huggingface_hub's own knob) overrides it.
DOWNLOAD_TIMEOUT = 10
HUB = "https://huggingface.co"
_REPO_PART = r"(?!.*(--|\.\.))[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
REPO_ID = re.compile(rf"(?:{_REPO_PART}/)?{_REPO_PART}")


class DownloadError(RuntimeError):
    """A download failed or could not start; the message says what to do instead."""


def repo_folder_name(repo_id: str) -> str:
    """The folder under models/bagel for a Hugging Face repo id: `owner--name` (the Hub forbids "--"
    inside a name, so two repo ids never share a folder)."""
    repo_id = repo_id.strip().strip("/")
    if not REPO_ID.fullmatch(repo_id):
        raise DownloadError(
            f"repo_id {repo_id!r} is not a Hugging Face repository id: write it as owner/name, e.g. "
            f"{OFFICIAL_REPO}"
        )
    return repo_id.replace("/", "--")


def broken_files(folder: Path) -> list[str]:
    """The files of `folder` that a load needs and that are missing or unreadable: the configs, the
    weights (`find_weights`: a file, or an index and its shards; "ema.safetensors" when there are none),
    ae.safetensors when it is there (a fine-tune may leave it to models/vae). A safetensors file is
    unreadable when truncated (its header promises more bytes than the file holds), a JSON file when cut
    short."""
    needed = list(CONFIG_FILES)
    try:
        weights = find_weights(folder)
    except CheckpointError:  # no weights at all (or several indexes): fetch the official file
        weights = folder / "ema.safetensors"
    needed.append(weights.name)
    if weights.name.endswith(INDEX_SUFFIX):
        with contextlib.suppress(CheckpointError):  # an unreadable index is listed already: fetched again
            needed += sorted(set(read_index(weights).values()))
    if (folder / AE_FILE).exists():
        needed.append(AE_FILE)
    broken = []
    for name in needed:
        path = folder / name
        if not path.is_file():
            broken.append(name)
            continue
        try:
            if name.endswith(".safetensors"):
                read_header(path)
            else:
                json.loads(path.read_text(encoding="utf-8"))
        except (CheckpointError, ValueError, OSError):
            broken.append(name)
    return broken


def download(repo_id: str, timeout: int | None = None) -> Path:
    """`models/bagel/<owner>--<name>`, after fetching the repo from Hugging Face if any required file is
    missing or damaged there (damaged files are deleted first, so they are fetched again)."""
    roots = comfy_bridge.model_roots()
    if not roots:
        raise DownloadError("download_if_missing needs ComfyUI's model folders; run inside ComfyUI")
    name = repo_folder_name(repo_id)
    repo_id = name.replace("--", "/")
    folder = roots[0] / name
    broken = broken_files(folder)
    if not broken:
        return folder
    for file in broken:
        (folder / file).unlink(missing_ok=True)
    fetch(repo_id, folder, _timeout(timeout))
    still = broken_files(folder)
    if still:
        raise DownloadError(
            f"{repo_id} was downloaded to {folder} but {', '.join(still)} is missing or unreadable there: it "
            "is not a BAGEL model folder (ByteDance-Seed/BAGEL-7B-MoT's layout, or a fine-tune's). Check "
            "repo_id."
        )
    return folder


def _timeout(timeout: int | None) -> int:
    if timeout is not None:
        return timeout
    value = os.environ.get("HF_HUB_ETAG_TIMEOUT", "")
    return int(value) if value.strip().isdigit() else DOWNLOAD_TIMEOUT


# Run by `fetch` in a child process: every file of the repo into the folder, each request with a timeout;
# on failure one line "BAGEL_FETCH_ERROR {kind, message}" on stdout, kind naming the exception and its
# causes (a timeout often arrives wrapped). Progress bars go to stderr: the console, as huggingface_hub
# draws them.
_FETCH = r"""
import json, sys
repo_id, folder, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    from huggingface_hub import HfApi, hf_hub_download
    info = HfApi().model_info(repo_id, timeout=timeout)
    for name in sorted(s.rfilename for s in info.siblings or ()):
        hf_hub_download(repo_id, name, revision=info.sha, local_dir=folder, etag_timeout=timeout)
except BaseException as e:
    kinds, cause = [], e
    while cause is not None and len(kinds) < 8:
        kinds.append(type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    failure = {"kind": " <- ".join(kinds), "message": str(e)}
    print("\nBAGEL_FETCH_ERROR " + json.dumps(failure), flush=True)
    sys.exit(1)
"""
_POLL_SECONDS = 0.2


def fetch(repo_id: str, folder: Path, timeout: int) -> None:
    """Download `repo_id` into `folder` in a child process, honouring ComfyUI's Cancel while it runs.
    Raises DownloadError naming the cause and the way out."""
    if importlib.util.find_spec("huggingface_hub") is None:
        raise DownloadError(
            "download_if_missing needs the huggingface_hub package (pip install huggingface_hub), or turn "
            f"download_if_missing off and put the model folder in {folder} yourself"
        )
    # huggingface_hub reads these when the child imports it: metadata requests wait `timeout`, data
    # requests too unless the user set their own limit.
    env = {**os.environ, "HF_HUB_ETAG_TIMEOUT": str(timeout)}
    env.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(timeout))
    command = [sys.executable, "-c", _FETCH, repo_id, str(folder), str(timeout)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, text=True)
    try:
        while True:
            try:
                out, _ = child.communicate(timeout=_POLL_SECONDS)
                break
            except subprocess.TimeoutExpired:
                comfy_bridge.check_interrupt()
    finally:
        if child.poll() is None:  # cancelled (or any other exception): stop the download now
            child.kill()
            child.wait()
    if child.returncode == 0:
        return
    failure = {"kind": f"exit status {child.returncode}", "message": ""}
    for line in out.splitlines():
        if line.startswith("BAGEL_FETCH_ERROR "):
            failure = json.loads(line.split(" ", 1)[1])
    raise DownloadError(_explain(repo_id, folder, timeout, failure["kind"], failure["message"]))


def _explain(repo_id: str, folder: Path, timeout: int, kind: str, message: str) -> str:
    endpoint = os.environ.get("HF_ENDPOINT") or HUB
    offline = "OfflineMode" in kind or "outgoing traffic has been disabled" in message
    if offline:
        cause = "downloads are switched off in this environment (HF_HUB_OFFLINE is set)"
    elif "Timeout" in kind:
        cause = (
            f"{endpoint} did not answer within {timeout} s (on a slow network raise the limit with the "
            "environment variables HF_HUB_ETAG_TIMEOUT and HF_HUB_DOWNLOAD_TIMEOUT, in seconds)"
        )
    elif "Connect" in kind:
        cause = f"{endpoint} cannot be reached"
    elif "RepositoryNotFound" in kind or "GatedRepo" in kind:
        cause = "the repository does not exist or needs you to log in (HF_TOKEN) and accept its terms"
    else:
        cause = f"{kind}: {message.strip()[:500]}"
    return (
        f"Downloading {repo_id} failed: {cause}. Queue again once this is fixed (finished files are kept), "
        f"or turn download_if_missing off and put the model folder in {folder} yourself (official layout: "
        f"{', '.join(OFFICIAL_FILES)}, tokenizer files), then pick {folder.name} in model_name."
    )
