"""The public API: no import shadows ``xrayjax.fit``, the README's Python examples run as written,
and the module layout keeps its one-way dependencies."""

import ast
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _python(code: str, cwd: pathlib.Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "", **env}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=600)


def test_readme_python_examples_run_as_written_after_importing_the_cli_module(data_root, tmp_path):
    # One fresh interpreter: `import xrayjax.train` first (a test collector or a notebook may
    # import the CLI module), then every ```python block of the README as written; the
    # training example calls xrayjax.fit, which no import may shadow.
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 2 and any("xrayjax.fit(" in b for b in blocks)
    prelude = "import xrayjax.train\nassert callable(xrayjax.train.main)\n"
    done = _python(prelude + "\n".join(blocks), tmp_path, TFDS_DATA_DIR=str(tmp_path / "tfds"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "runs" / "try" / "metrics.json").is_file()


def _imports() -> dict[str, set[str]]:
    """Each xrayjax module and the xrayjax modules it imports."""
    modules = {}
    for path in (REPO / "xrayjax").rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("xrayjax"):
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("xrayjax")}
        modules[name] = found
    return {m: {d for d in deps if d in modules and d not in (m, "xrayjax")} for m, deps in modules.items()}


@pytest.mark.parametrize(("module", "never"), [
    ("xrayjax.steps", {"xrayjax.loop", "xrayjax.runfiles", "xrayjax.train", "xrayjax.evaluate"}),
    ("xrayjax.bench", {"xrayjax.loop", "xrayjax.runfiles", "xrayjax.train"}),
    ("xrayjax.loop", {"xrayjax.evaluate", "xrayjax.predict", "xrayjax.gradcam", "xrayjax.train", "xrayjax.crossval"}),
    ("xrayjax.crossval", {"xrayjax.train", "xrayjax.evaluate"}),
    ("xrayjax.stats", {"xrayjax.data", "xrayjax.models", "xrayjax.steps", "xrayjax.loop", "xrayjax.evaluate"}),
    ("xrayjax.data.pipeline", {"xrayjax.steps", "xrayjax.loop", "xrayjax.runfiles", "xrayjax.evaluate"}),
    ("xrayjax.evaluate", {"xrayjax.loop", "xrayjax.train"}),
    ("xrayjax.predict", {"xrayjax.loop", "xrayjax.train"}),
])
def test_dependencies_point_one_way(module, never):
    graph = _imports()

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for dep in graph[todo.pop()] - seen:
                seen.add(dep)
                todo.append(dep)
        return seen

    assert not reach(module) & never


def test_no_import_cycles():
    graph = _imports()
    for start in graph:
        seen, todo = set(), [start]
        while todo:
            for dep in graph[todo.pop()] - seen:
                seen.add(dep)
                todo.append(dep)
        assert start not in seen, f"{start} imports itself through {sorted(seen)}"
