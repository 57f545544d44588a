"""`bagel_model` is a plain PyTorch library: it must never import ComfyUI.

The layering (library below, `nodes/` adapters above) is what lets the CLI, the training recipe and the
tests run without ComfyUI, and what keeps ComfyUI's globals (folder_paths, model_management, the server)
out of library code. Two checks:

- dynamic: a fresh Python imports every module of the package and runs a small task on the bundled model,
  with a meta-path hook recording every attempt to import a ComfyUI module, even a guarded
  `try: import comfy ... except ImportError` that leaves nothing behind in `sys.modules`;
- static: no import statement or `importlib.import_module("...")` call in `bagel_model/**/*.py` names one.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bagel_model"

# Top-level modules of a ComfyUI install (its root folder is on sys.path when it runs), plus the name of
# this repository's own adapter package, which the library must not reach for either.
COMFYUI_MODULES = frozenset(
    {
        "comfy",
        "comfy_api",
        "comfy_execution",
        "comfy_extras",
        "comfy_config",
        "folder_paths",
        "latent_preview",
        "node_helpers",
        "nodes",
        "server",
        "execution",
    }
)

# Runs in a fresh interpreter: records imports of the names above, runs TASK, prints what it saw as JSON.
PROBE = """
import importlib, json, pkgutil, sys

FORBIDDEN = set({forbidden})
attempted = []

class Recorder:
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in FORBIDDEN:
            attempted.append(fullname)
        return None  # never answers: the import goes on as it would have

sys.meta_path.insert(0, Recorder())
{task}
loaded = sorted(n for n in sys.modules if n.split(".")[0] in FORBIDDEN)
print("LAYERING " + json.dumps({{"attempted": sorted(set(attempted)), "loaded": loaded}}))
"""

# Every module of the package (not __main__, which would run the CLI), then the bundled model's smallest
# round trip: draw a picture in a few steps and ask about it in the same context.
LIBRARY_TASK = """
import bagel_model
from bagel_model import bundled

for info in pkgutil.walk_packages(bagel_model.__path__, "bagel_model."):
    if not info.name.endswith("__main__"):
        importlib.import_module(info.name)

model = bagel_model.load(bundled.default_model_dir())
out = bagel_model.generate_images(
    model, "a red circle at the top left", settings=bagel_model.FlowSettings(num_steps=3), seed=0
)
image, context = out.images[0], out.contexts[0]
answer, _ = bagel_model.understand(
    model, "what is at the top left?", context=context, settings=bagel_model.TextSettings(max_new_tokens=4)
)
assert image.size[0] > 0 and isinstance(answer, str)
"""


def run_probe(task: str, extra_path: Path | None = None) -> dict[str, list[str]]:
    """Run `task` in a fresh interpreter (repository root as working directory) under the import recorder;
    `extra_path` goes first on its module search path."""
    source = PROBE.format(forbidden=sorted(COMFYUI_MODULES), task=textwrap.dedent(task))
    env = {**os.environ, "PYTHONPATH": str(extra_path)} if extra_path else None
    done = subprocess.run(
        [sys.executable, "-c", source], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("LAYERING ")]
    return json.loads(line.removeprefix("LAYERING "))


def test_the_probe_sees_comfyui_imports_guarded_or_not(tmp_path: Path):
    """The recorder catches what the layering test looks for: a guarded import that fails quietly, and
    an import of a module that exists (a stand-in for ComfyUI's folder_paths on the search path)."""
    (tmp_path / "folder_paths.py").write_text("")
    seen = run_probe(
        """
        try:
            import comfy.model_management
        except ImportError:
            pass
        import folder_paths
        """,
        extra_path=tmp_path,
    )
    assert seen == {"attempted": ["comfy", "folder_paths"], "loaded": ["folder_paths"]}


def test_library_imports_and_runs_without_touching_comfyui():
    seen = run_probe(LIBRARY_TASK)
    assert seen == {"attempted": [], "loaded": []}


def imported_names(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every absolute import and every `import_module("...")`/`__import__("...")`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and dynamic_import_name(node) is not None:
            found.append((node.lineno, dynamic_import_name(node)))
    return found


def dynamic_import_name(call: ast.Call) -> str | None:
    """The literal module name of an `importlib.import_module`/`__import__` call, if it has one."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in ("import_module", "__import__") or not call.args:
        return None
    first = call.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def test_imported_names_finds_static_and_dynamic_imports():
    tree = ast.parse(
        "import os\nfrom comfy import utils\nimportlib.import_module('folder_paths')\nfrom . import x"
    )
    assert imported_names(tree) == [(1, "os"), (2, "comfy"), (3, "folder_paths")]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_library_source_names_a_comfyui_module(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad = [(line, name) for line, name in imported_names(tree) if name.split(".")[0] in COMFYUI_MODULES]
    assert not bad, f"{path.relative_to(ROOT)} imports ComfyUI modules at lines {bad}: keep them in nodes/"
