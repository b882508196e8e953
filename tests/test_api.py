"""The public API and its docs: no import shadows ``xrayjax.fit``, the Python examples of the README
and of docs/ run as written, their shell commands parse, their links resolve, and the module
layout keeps its one-way dependencies."""

import argparse
import ast
import contextlib
import importlib
import importlib.util
import io
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# The two set-up commands of the README, kept exactly as the project's instructions give them.
SETUP_COMMANDS = (
    'python3 -m pip install -e ".[dev]" && python3 -m xrayjax.train --arch vgg19 --init random '
    "--data-dir ../shared/covid_xray --out runs/vgg19",
    'python3 -m pip install -e ".[dev]" && python3 -m pytest -q',
)
# The commands the docs may show: `python -m MODULE` (a package runs its __main__) or `python SCRIPT`,
# each parsed by its main(argv).
COMMANDS = {"xrayjax.train", "xrayjax.evaluate", "xrayjax.predict", "xrayjax.data", "xrayjax.models", "xrayjax.bench",
            "weights/port.py", "experiments/reproduce_report.py"}
NOT_OURS = {"pip", "pytest"}  # python -m pip / pytest: not the project's commands


def _fenced(page: pathlib.Path, languages: tuple[str, ...]) -> list[str]:
    """The fenced code blocks of ``page`` in one of ``languages``, in order."""
    return [body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", page.read_text(), flags=re.S | re.M)
            if lang in languages]


def _page_id(page: pathlib.Path) -> str:
    return page.relative_to(REPO).as_posix()


def test_every_page_is_linked_from_the_readme_and_the_readme_is_short():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    for command in SETUP_COMMANDS:
        assert command in readme, f"the README lost its set-up command {command!r}"
    for page in PAGES[1:]:
        assert f"]({_page_id(page)})" in readme, f"README.md does not link {_page_id(page)}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_links_point_to_files_and_headings_that_exist(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{_page_id(page)} links {target}: no such file"
        if anchor and linked.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.M)
            assert anchor in {_slug(h) for h in headings}, f"{_page_id(page)} links {target}: no such heading"


def _shell_commands(page: pathlib.Path) -> list[tuple[str, list[str]]]:
    """(command, argv) of every project command in ``page``: each line of its bash blocks, and
    every inline code span that starts with python."""
    lines = [line for block in _fenced(page, ("bash", "sh")) for line in block.splitlines()]
    lines += re.findall(r"`(python3? [^`]+)`", page.read_text())
    found = []
    for line in lines:
        for part in re.split(r"&&|\|\||;|\|", line):
            words = shlex.split(part, comments=True)
            starts = [i for i, w in enumerate(words) if w in ("python", "python3")]
            if not starts:
                continue
            words = words[starts[0] + 1:]
            target = words[1] if words[:1] == ["-m"] else words[0]
            argv = words[2:] if words[:1] == ["-m"] else words[1:]
            if target not in NOT_OURS:
                found.append((target, argv))
    return found


class _Parsed(Exception):
    """Raised by the patched ArgumentParser.parse_args once the command line has parsed."""


def _command_main(target: str):
    """The main() that `python TARGET` (a script, loaded once under its own name) or
    `python -m TARGET` (a package runs its __main__) calls."""
    if target.endswith(".py"):
        name = "_script_" + pathlib.Path(target).stem
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, REPO / target)
            sys.modules[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(sys.modules[name])
        return sys.modules[name].main
    module = importlib.import_module(target)
    if hasattr(module, "__path__"):
        module = importlib.import_module(target + ".__main__")
    return module.main


def test_shell_commands_in_the_docs_parse_as_written(monkeypatch):
    # Every `python -m xrayjax...` and project script the pages show is parsed by its own
    # command line (flags, choices, required arguments), without running it: main(argv) runs
    # until its parser has parsed, here, from the repository root.
    commands = []
    for page in PAGES:
        for target, argv in _shell_commands(page):
            assert target in COMMANDS, f"{_page_id(page)} shows an unknown command: python {target} {argv}"
            commands.append((_page_id(page), target, argv))
    assert {c[1] for c in commands} >= {"xrayjax.train", "xrayjax.data", "xrayjax.evaluate", "xrayjax.predict"}
    parse_args = argparse.ArgumentParser.parse_args

    def parse_only(self, *args, **kwargs):
        parse_args(self, *args, **kwargs)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    monkeypatch.chdir(REPO)
    failures = []
    for where, target, argv in commands:
        err = io.StringIO()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                _command_main(target)(argv)
            failures.append(f"{where}: {target} {argv}: main() ran past its parser")
        except _Parsed:
            pass
        except SystemExit as e:
            if e.code not in (0, None):
                failures.append(f"{where}: {target} {' '.join(argv)}: {err.getvalue().strip()}")
    assert not failures, "\n".join(f.splitlines()[0] + " " + f.splitlines()[-1] for f in failures)


_RUN_PAGES = """
import contextlib, json, os, sys, traceback
results = {}
for page, code, cwd in json.load(sys.stdin):
    environ = dict(os.environ)
    os.chdir(cwd)
    print(f"=== {page}", flush=True)
    try:
        exec(compile(code, page, "exec"), {"__name__": "__main__"})
        results[page] = None
    except BaseException:  # SystemExit included: the page failed
        results[page] = traceback.format_exc()
    finally:  # the next page starts from the same environment (docs/multi-host.md sets OMPI_*)
        os.environ.clear()
        os.environ.update(environ)
with open(sys.argv[1], "w") as f:
    json.dump(results, f)
"""
EXAMPLE_PAGES = [p for p in PAGES if _fenced(p, ("python",))]


@pytest.fixture(scope="module")
def examples_run(data_root, tmp_path_factory) -> dict:
    """Every page's ```python blocks as written, in order (a block may use what an earlier one
    made), each page in an empty folder of its own and a fresh namespace, all in one interpreter
    (one JAX import, one prepared-data folder). The README runs first: its prelude imports the
    CLI module (a test collector or a notebook may), then it calls xrayjax.fit, which no import
    may shadow. Returns each page's folder and its traceback (None when it ran)."""
    root = tmp_path_factory.mktemp("examples")
    assert EXAMPLE_PAGES[0].name == "README.md"
    jobs, folders = [], {}
    for page in EXAMPLE_PAGES:
        blocks = _fenced(page, ("python",))
        prelude = ""
        if page.name == "README.md":
            assert any("xrayjax.fit(" in b for b in blocks)
            prelude = "import xrayjax.train\nassert callable(xrayjax.train.main)\n"
        folders[page] = root / _page_id(page).replace("/", "_")
        folders[page].mkdir()
        jobs.append((_page_id(page), prelude + "\n".join(blocks), str(folders[page])))
    results = root / "results.json"
    environment = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "", "TFDS_DATA_DIR": str(root / "tfds")}
    done = subprocess.run([sys.executable, "-c", _RUN_PAGES, str(results)], input=json.dumps(jobs), cwd=root,
                          env=environment, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"folders": folders, "failures": json.loads(results.read_text())}


@pytest.mark.parametrize("page", EXAMPLE_PAGES, ids=_page_id)
def test_python_examples_run_as_written(page, examples_run):
    failure = examples_run["failures"][_page_id(page)]
    assert failure is None, failure[-3000:]
    if page.name == "README.md":
        assert (examples_run["folders"][page] / "runs" / "try" / "metrics.json").is_file()


def test_the_readme_and_the_docs_have_python_examples():
    assert {_page_id(p) for p in PAGES if _fenced(p, ("python",))} >= {"README.md", "docs/models.md"}


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
    ("xrayjax.steps", {"xrayjax.trainer", "xrayjax.loop", "xrayjax.runfiles", "xrayjax.train", "xrayjax.evaluate"}),
    ("xrayjax.trainer", {"xrayjax.loop", "xrayjax.runfiles", "xrayjax.evaluate", "xrayjax.train", "xrayjax.crossval"}),
    ("xrayjax.bench", {"xrayjax.loop", "xrayjax.runfiles", "xrayjax.train"}),
    ("xrayjax.loop", {"xrayjax.evaluate", "xrayjax.predict", "xrayjax.gradcam", "xrayjax.train", "xrayjax.crossval"}),
    ("xrayjax.crossval", {"xrayjax.train", "xrayjax.evaluate"}),
    ("xrayjax.stats", {"xrayjax.data", "xrayjax.models", "xrayjax.steps", "xrayjax.loop", "xrayjax.evaluate"}),
    ("xrayjax.data.splits", {"xrayjax.steps", "xrayjax.loop", "xrayjax.runfiles", "xrayjax.evaluate"}),
    ("xrayjax.evaluate", {"xrayjax.trainer", "xrayjax.loop", "xrayjax.train"}),
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
