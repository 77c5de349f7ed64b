"""Package layout rules: graph work imports no torch, ``graph_tools`` never imports ``exporters``
(the CLI's torch commands aside, inside those commands), imports between ``graph_tools`` folders
run one way (no cycle), passes depend on detection and errors only, and the top-level API is
eager and complete."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "graph_tools"
FIXTURE = ROOT / "fixtures" / "dynamo_llama.onnx"
#: what a pass may import from graph_tools (besides other passes)
PASS_DEPENDENCIES = {"lora", "errors"}


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def test_graph_tools_imports_without_torch():
    res = _python(
        "import sys, graph_tools; from graph_tools import AdapterSession, extract_adapters; "
        "assert 'torch' not in sys.modules; "
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'exporters') if m in sys.modules); "
        "print(heavy)"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_cli_inspect_imports_no_torch():
    res = _python(
        "import sys; from graph_tools import cli; code = cli.main(['inspect', %r]); "
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'exporters') if m in sys.modules); "
        "print(code, heavy)" % str(FIXTURE)
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "0 []"
    assert "LoRA sites on" in res.stdout  # it really inspected the graph


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path):
    """``(imported module, line, top_level)`` for every import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    top_level = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, id(node) in top_level
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from graph_tools.adapters import files` imports a module
                sub = f"{base}.{alias.name}"
                is_module = (ROOT / Path(*sub.split("."))).with_suffix(".py").is_file() or (ROOT / Path(*sub.split("."))).is_dir()
                yield (sub if is_module else base), node.lineno, id(node) in top_level


def _unit(module: str) -> str | None:
    """The folder (``lora``, ``passes`` ...) or top-level module (``errors``, ``_io``) of a
    graph_tools module; None for the package facade ``graph_tools`` itself and outside modules."""
    parts = module.split(".")
    if parts[0] != "graph_tools":
        return None
    return parts[1] if len(parts) > 1 else None


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_import_parser_sees_every_kind_of_import():
    """The checks below rest on _imports: it must see nested, relative and from-imports."""
    found = {m for path in SOURCES for m, _, _ in _imports(path)}
    assert "graph_tools.adapters.files" in found  # `from graph_tools.adapters import files`
    assert "exporters.pipelines" in found  # nested in a CLI command
    assert "graph_tools.lora.detect" in found


def test_graph_tools_never_imports_exporters():
    offenders = []
    for path in SOURCES:
        for module, line, top_level in _imports(path):
            if module.split(".")[0] != "exporters":
                continue
            # the CLI is the one shell over both packages: torch commands import it inside the command
            if path.name == "cli.py" and path.parent == PACKAGE and not top_level:
                continue
            offenders.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert offenders == []


def test_no_module_imports_the_package_facade():
    """``from graph_tools import X`` inside graph_tools would make every module depend on all."""
    offenders = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in SOURCES if path != PACKAGE / "__init__.py"
        for module, line, _ in _imports(path) if module == "graph_tools"
    ]
    assert offenders == []


def _folder_graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in SOURCES:
        src = _unit(_module_name(path))
        if src is None or src == "cli":  # the facade and the CLI sit above everything
            continue
        for module, _, _ in _imports(path):
            dst = _unit(module)
            if dst is not None and dst != src:
                edges.setdefault(src, set()).add(dst)
    return edges


def test_no_cycle_between_graph_tools_folders():
    edges = _folder_graph()
    assert {"passes", "adapters", "lora"} <= set(edges)  # the graph is real, not empty
    cycles = []

    def visit(node, stack):
        if node in stack:
            cycles.append(" -> ".join(stack[stack.index(node):] + [node]))
            return
        for nxt in sorted(edges.get(node, ())):
            visit(nxt, stack + [node])

    for start in sorted(edges):
        visit(start, [])
    assert cycles == []


def test_passes_depend_on_detection_and_errors_only():
    assert _folder_graph()["passes"] <= PASS_DEPENDENCIES


def test_top_level_api_is_eager_and_complete():
    import graph_tools
    from graph_tools import errors

    assert not hasattr(graph_tools, "__getattr__")
    readme_names = {"find_lora_sites", "LoraSite", "extract_adapters", "convert_peft_adapter", "AdapterSession",
                    "merge_adapter", "strip_adapters", "quantize", "read_encodings"}
    error_names = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, errors.LoraOnnxError)}
    assert readme_names | error_names <= set(graph_tools.__all__)
    assert all(hasattr(graph_tools, n) for n in graph_tools.__all__)
    assert set(graph_tools.__all__) <= set(dir(graph_tools))


@pytest.mark.torch
def test_exporters_api():
    import exporters

    assert {"export_peft", "pipeline"} <= set(exporters.__all__) == _static_all(ROOT / "exporters" / "__init__.py")
    assert callable(exporters.pipeline) and callable(exporters.export_peft)


def _readme_imports() -> list[str]:
    text = (ROOT / "README.md").read_text()
    lines = []
    for block in text.split("```python")[1:]:
        lines += [ln.strip() for ln in block.split("```")[0].splitlines() if ln.strip().startswith(("from ", "import "))]
    return lines


def test_readme_imports_only_the_top_level_api():
    lines = _readme_imports()
    ours = [ln for ln in lines if ln.split()[1].split(".")[0] in ("graph_tools", "exporters")]
    assert ours, "README shows no import of the API"
    deep = [ln for ln in ours if ln.split()[1] not in ("graph_tools", "exporters")]
    assert deep == []
    import graph_tools

    exported = {"graph_tools": set(graph_tools.__all__), "exporters": _static_all(ROOT / "exporters" / "__init__.py")}
    for line in ours:
        names = [n.strip() for n in line.split(" import ", 1)[1].split("#")[0].split(",")]
        assert set(names) <= exported[line.split()[1]], line


def _static_all(path: Path) -> set[str]:
    """``__all__`` of a module read without importing it (exporters imports torch)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def _bash_block_after(text: str, heading: str) -> str:
    section = text.split(heading, 1)[1]
    return section.split("```bash", 1)[1].split("```", 1)[0].strip()


def test_front_door_is_two_commands():
    """README's two commands are `make demo` and `make test`; CI runs the README's test command;
    both targets create .venv when it is missing."""
    readme = (ROOT / "README.md").read_text()
    demo = _bash_block_after(readme, "## Run the main job on the built-in default model")
    test = _bash_block_after(readme, "## Run the tests")
    assert (demo, test) == ("make demo", "make test")
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test in ci and "make test-core" in ci
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        rule = makefile.split(f"\n{target}:", 1)[1].split("\n\n", 1)[0]
        assert "$(VENV)/.setup-done" in rule.splitlines()[0], target
    assert "-m venv $(VENV)" in makefile and "sh scripts/setup.sh" in makefile


def _pass_classes(tree: ast.Module) -> list[ast.ClassDef]:
    """Concrete onnx-ir pass classes defined in a module (``LoraPass`` itself is the base)."""
    def base_name(b):
        return b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "")

    return [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name != "LoraPass"
            and any(base_name(b).endswith("Pass") for b in n.bases)]


def test_pass_files_are_small_and_sketched():
    """Every file defining a pass (graph_tools, exporters) is under ~250 lines and shows the graph
    before and after in its docstring or the pass's."""
    files = sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "exporters").glob("*.py"))
    found = []
    for path in files:
        tree = ast.parse(path.read_text())
        for cls in _pass_classes(tree):
            found.append(cls.name)
            text = ((ast.get_docstring(tree) or "") + (ast.get_docstring(cls) or "")).lower()
            assert "before" in text and "after" in text, f"{path.relative_to(ROOT)}: {cls.name} has no before/after sketch"
        if _pass_classes(tree):
            assert len(path.read_text().splitlines()) <= 260, f"{path.relative_to(ROOT)} is over ~250 lines"
    assert {"ReplaceLoraWithSlotsPass", "FoldAdapterPass", "StripSlotsPass", "PackSlotsPass", "RestoreNamesPass"} <= set(found)


def test_exporter_passes_are_graph_work():
    """exporters/passes.py (the exporter's graph edits) imports no torch/transformers/peft."""
    path = ROOT / "exporters" / "passes.py"
    heavy = [m for m, _, _ in _imports(path) if m.split(".")[0] in ("torch", "transformers", "peft")]
    assert heavy == []
