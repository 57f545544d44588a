"""The UI-format example workflows in ComfyUI's own frontend, in headless Chromium.

Each workflow is loaded through the page's JavaScript (`app.loadGraphData`, what drag-and-drop does): every
node type must be registered (no "missing nodes"), every widget must read back the value the file stores,
and the frontend's conversion to a prompt (`app.graphToPrompt`, what "Queue" sends) must equal the
API-format twin in example_workflows/api/. Then each workflow is queued from the page, and the nodes must
show their text and context summary (web/bagel.js); the page is screenshotted (kept in pytest's temporary
folder; with BAGEL_WRITE_THUMBNAILS=1 also written as the workflow's thumbnail). Understand and Think, queued
from the page, must show their text in the node's one text box while they decode (live text), and once.

Needs $COMFYUI_DIR (see conftest.py) and Debian's `chromium` (or $CHROMIUM); skipped otherwise, failed
under CI=true. Chromium is driven over the DevTools protocol with websocket-client (no Playwright, no
browser download), started with a fresh profile and no network features, and stopped by its process id.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import ModuleType

import pytest
from conftest import ComfyServer
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"
NAMES = sorted(p.stem for p in EXAMPLES.glob("*.json"))
APP = "window.comfyAPI.app.app"
TEXT = "$$node-text-preview"  # the text box's name: the frontend's progress-text widget (web/bagel.js)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


class Page:
    """One Chromium tab on `server`'s frontend over the DevTools protocol: evaluate JavaScript, take
    screenshots."""

    def __init__(
        self, server: ComfyServer, binary: str, websocket: ModuleType, width: int = 1600, height: int = 1000
    ):
        self.server = server  # the ComfyServer whose frontend this tab shows
        self.profile = tempfile.mkdtemp(prefix="bagel-chromium-")
        self.process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0"]
            + [f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.exceptions: list[dict] = []
        self._ids = itertools.count(1)
        self.ws = websocket.create_connection(self._page_socket(), timeout=120, suppress_origin=True)
        self.call("Runtime.enable")
        self.call("Page.navigate", url=server.url)
        self.wait_for(f"!!({APP}?.graph && {APP}.vueAppReady)")

    def _page_socket(self) -> str:
        """The tab's DevTools websocket; Chromium writes the port it picked into the profile folder."""
        deadline = time.monotonic() + 30
        while True:
            try:
                port = (Path(self.profile) / "DevToolsActivePort").read_text().split()[0]
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as response:
                    targets = json.loads(response.read())
                return next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            except (OSError, IndexError, StopIteration):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def call(self, method: str, **params):
        call_id = next(self._ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("method") == "Runtime.exceptionThrown":
                self.exceptions.append(message["params"]["exceptionDetails"])
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def js(self, expression: str):
        """Evaluate `expression` in the page (awaiting a promise) and return its JSON value."""
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(json.dumps(result["exceptionDetails"])[:2000])
        return result["result"].get("value")

    def wait_for(self, condition: str, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while not self._true(condition):
            if time.monotonic() > deadline:
                raise TimeoutError(condition)
            time.sleep(0.25)

    def _true(self, condition: str) -> bool:
        try:
            return bool(self.js(condition))
        except RuntimeError:
            return False

    def screenshot(self, clip: dict) -> Image.Image:
        data = self.call("Page.captureScreenshot", format="png", clip={**clip, "scale": 1})["data"]
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")

    def close(self) -> None:
        self.ws.close()
        self.process.terminate()
        self.process.wait(timeout=30)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module", params=["pinned", "current"])
def page(request, chromium, websocket_client):
    """A tab on the pinned ComfyUI's own frontend, then on the one today's ComfyUI ships."""
    server = request.getfixturevalue("server" if request.param == "pinned" else "current_frontend_server")
    server.post("/settings/Comfy.TutorialCompleted", True)  # no first-run template picker
    server.post("/settings/Comfy.Minimap.Visible", False)  # clean screenshots: no minimap, no stats
    server.post("/settings/Comfy.Graph.CanvasInfo", False)
    opened = Page(server, chromium, websocket_client)
    opened.wait_for("!!LiteGraph.registered_node_types.BAGELLoader")  # node definitions arrive last
    yield opened
    opened.close()


def load(page: Page, name: str) -> dict:
    """Open an example workflow. A newer frontend may still be opening its own startup workflow when the
    page is ready, and that one can replace ours: load again until the graph is ours."""
    flow = (EXAMPLES / f"{name}.json").read_text()
    ids = json.dumps(sorted(str(n["id"]) for n in json.loads(flow)["nodes"]), separators=(",", ":"))  # as JS
    for _ in range(3):
        page.js(f"{APP}.loadGraphData({flow}, true, true, {json.dumps(name)})")
        try:
            page.wait_for(
                f"JSON.stringify({APP}.graph._nodes.map(n => String(n.id)).sort()) === {json.dumps(ids)}", 10
            )
            break
        except TimeoutError:
            continue
    else:
        pytest.fail(f"the frontend did not keep {name}.json open (its graph is another workflow)")
    return json.loads(flow)


def test_pack_extension_is_loaded(page):
    assert "comfyui-bagel-mot.outputs" in page.js(f"{APP}.extensions.map(e => e.name)")


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_loads_whole_and_converts_to_its_api_twin(page, name):
    flow = load(page, name)
    nodes = page.js(
        f"""{APP}.graph._nodes.map(n => ({{
            id: n.id, type: n.type, registered: !!LiteGraph.registered_node_types[n.type],
            values: (n.widgets || []).filter(w => w.serialize !== false).map(w => w.value) }}))"""
    )
    assert [str(n["id"]) for n in nodes] == [str(n["id"]) for n in flow["nodes"]]  # newer frontends: strings
    for node, saved in zip(nodes, flow["nodes"], strict=True):
        assert node["registered"], f"{name}: node type {node['type']} is missing"
        assert node["values"] == saved.get("widgets_values", []), f"{name}: node {node['id']} widgets"
    prompt = page.js(f"{APP}.graphToPrompt().then(p => p.output)")
    api = json.loads((EXAMPLES / "api" / f"{name}.json").read_text())
    assert {k: (v["class_type"], v["inputs"]) for k, v in prompt.items()} == {
        k: (v["class_type"], v["inputs"]) for k, v in api.items()
    }
    ours = [e for e in page.exceptions if "comfyui-bagel-mot" in json.dumps(e)]
    assert not ours, ours


@pytest.mark.parametrize("name", NAMES)
def test_queued_from_the_page_the_nodes_show_their_results(page, name, tmp_path):
    load(page, name)
    page.js(
        f"""new Promise(resolve => {{
            const api = window.comfyAPI.api.api;
            const done = () => {{ api.removeEventListener('execution_success', done); resolve(); }};
            api.addEventListener('execution_success', done);
            {APP}.queuePrompt(0, 1);
        }})"""
    )
    page.wait_for(  # every node that passes a context on shows its summary; Train LoRA, what it saved
        f"{APP}.graph._nodes.filter(n => n.type.startsWith('BAGEL') && n.type !== 'BAGELLoader')"
        ".every(n => (n.widgets || []).some(w => w.name === 'bagel_context' && w.label"
        f" || n.type === 'BAGELTrainLora' && w.name === {json.dumps(TEXT)} && w.value))"
    )
    shown = page.js(
        f"""{APP}.graph._nodes.filter(n => n.type.startsWith('BAGEL')).map(n => ({{type: n.type,
            text: n.widgets.find(w => w.name === {json.dumps(TEXT)})?.value,
            shown: n.widgets.find(w => w.name === {json.dumps(TEXT)})?.element?.value,
            context: n.widgets.find(w => w.name === 'bagel_context')?.label }}))"""
    )
    for node in shown:
        if node["type"] in ("BAGELUnderstand", "BAGELThink", "BAGELReason"):
            assert node["text"] and node["shown"] == node["text"], node  # in the node's own text box
        if node["type"] == "BAGELTrainLora":
            assert node["shown"].startswith("saved bagel_azure"), node
        elif node["type"] != "BAGELLoader":
            assert node["context"].startswith("context: ") and node["context"].endswith("MiB"), node
    picture = fit_and_screenshot(page)
    picture.save(tmp_path / f"{name}.png")
    if os.environ.get("BAGEL_WRITE_THUMBNAILS") == "1":
        picture.thumbnail((1024, 640))
        picture.save(EXAMPLES / f"{name}.jpg", quality=85)


@pytest.mark.parametrize(("name", "node_id"), [("understand", "4"), ("think_then_generate", "2")])
def test_text_shows_on_the_node_while_it_is_written_and_once(page, name, node_id):
    """Queued from the page, Understand and Think show their text in the node's one text box while they
    decode: after each progress-text message (read once the page has handled it, so it is what the box
    shows) the box holds a prefix of the final text, some of them before the node finished, and ends with
    the `ui` text. The frontend adds no text preview of its own: the node has one text widget, and no
    other element on the page shows the text."""
    load(page, name)
    page.server.free()  # run, not taken from the cache
    seen = page.js(
        f"""new Promise(resolve => {{
            const api = window.comfyAPI.api.api, node = {APP}.graph.getNodeById({node_id});
            const boxes = () => node.widgets.filter(w => w.name === {json.dumps(TEXT)});
            const seen = {{shown: [], boxes: [], final: null, after: null}};
            const onText = e => {{
                if (String(e.detail.nodeId) !== '{node_id}') return;
                const running = seen.final === null;  // the node's `executed` has not come
                queueMicrotask(() => {{  // after every listener of this message, the frontend's too
                    seen.shown.push({{running, text: boxes()[0]?.element?.value}});
                    seen.boxes.push(boxes().length);
                }});
            }};
            const onExecuted = e => {{
                if (String(e.detail.node) === '{node_id}') seen.final = e.detail.output.text.join("\\n\\n");
            }};
            const done = () => {{
                for (const [kind, f] of [['progress_text', onText], ['executed', onExecuted],
                                         ['execution_success', done]]) api.removeEventListener(kind, f);
                seen.after = {{boxes: boxes().length, tag: boxes()[0]?.element?.tagName,
                    text: boxes()[0]?.element?.value, widgets: node.widgets.map(w => w.name),
                    onPage: document.body.innerText.includes(seen.final)}};
                resolve(seen);
            }};
            api.addEventListener('progress_text', onText);
            api.addEventListener('executed', onExecuted);
            api.addEventListener('execution_success', done);
            {APP}.queuePrompt(0, 1);
        }})"""
    )
    final, shown = seen["final"], seen["shown"]
    assert final and all(isinstance(s.get("text"), str) for s in shown), seen  # in our text box
    during = [s["text"] for s in shown if s["running"]]
    assert len(during) >= 2 and any(len(text) < len(final) for text in during), seen
    assert all(final.startswith(s["text"]) for s in shown), seen
    assert shown[-1]["text"] == final
    assert set(seen["boxes"]) == {1}, seen  # one text widget all along: ours
    after = seen["after"]
    assert (after["boxes"], after["tag"], after["text"]) == (1, "TEXTAREA", final), after
    assert not after["onPage"], after  # a textarea's text is not in innerText: nothing else shows it


def fit_and_screenshot(page: Page) -> Image.Image:
    """Zoom the canvas so the whole graph fits, wait for a repaint, and take a picture of the graph."""
    box = page.js(
        f"""(() => {{
            const app = {APP}, rect = app.canvasEl.getBoundingClientRect(), pad = 20;
            const xs = app.graph._nodes.flatMap(n => [n.pos[0], n.pos[0] + n.size[0]]);
            const ys = app.graph._nodes.flatMap(n => [n.pos[1] - 30, n.pos[1] + n.size[1]]);
            const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
            const room = [rect.width - 2 * pad, rect.height - 2 * pad];
            const scale = Math.min(1, room[0] / (x1 - x0), room[1] / (y1 - y0));
            app.canvas.ds.scale = scale;
            app.canvas.ds.offset = [pad / scale - x0, pad / scale - y0];
            app.graph.setDirtyCanvas(true, true);
            return {{x: rect.x, y: rect.y, width: Math.min(rect.width, (x1 - x0) * scale + 2 * pad),
                     height: Math.min(rect.height, (y1 - y0) * scale + 2 * pad)}};
        }})()"""
    )
    time.sleep(1.0)
    return page.screenshot(box)
