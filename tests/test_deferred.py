"""graph_tools/_deferred.py: sympy (imported by onnx-ir at module level) loads on first use only,
and is then the ordinary module; nothing changes when it was imported first. Fresh processes:
what is in ``sys.modules`` depends on what ran before."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "dynamo_llama_two_adapters.onnx"


def _python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


def test_graph_work_never_loads_sympy(tmp_path):
    out = _python(
        "import sys, types, graph_tools; from graph_tools import extract_adapters, find_lora_sites, AdapterSession; "
        f"sites = find_lora_sites({str(FIXTURE)!r}); "
        f"pkg = extract_adapters({str(FIXTURE)!r}, {str(tmp_path / 'pkg')!r}); AdapterSession(pkg.path); "
        "print(len(sites) > 0, 'sympy.core' in sys.modules, type(sys.modules['sympy']) is types.ModuleType)"
    )
    assert out == ["True", "False", "False"]


def test_first_use_loads_the_real_module():
    out = _python(
        "import sys, types, graph_tools, onnx_ir as ir; "
        "d = ir.SymbolicDim('n') * 2 + 1; e = ir.SymbolicDim('max(a, b)')._expr; "  # onnx-ir's own sympy use
        "import sympy; from sympy import Symbol; "
        "print(d, e, sympy.simplify(Symbol('x') + Symbol('x')), type(sys.modules['sympy']) is types.ModuleType, "
        "sys.modules['sympy'] is sympy, sympy.__name__, bool(sympy.__file__))"
    )
    assert out == ["2*n", "+", "1", "Max(a,", "b)", "2*x", "True", "True", "sympy", "True"]


def test_nothing_deferred_when_sympy_came_first():
    out = _python(
        "import sys, types, sympy; import graph_tools; from graph_tools import _deferred; "
        "print(_deferred.defer(), type(sys.modules['sympy']) is types.ModuleType, "
        "type(sys.modules['onnx_ir._symbolic_shapes']) is types.ModuleType)"
    )
    assert out == ["False", "True", "True"]


def test_submodule_first_runs_the_package_first():
    """``from sympy.polys import ...`` before any sympy name: the package's own code runs first, as
    with an eager import (else sympy/__init__ would find sympy.polys half initialized)."""
    out = _python(
        "import sys, types, graph_tools; from sympy.polys import polytools; import sympy; "
        "print(type(sys.modules['sympy']) is types.ModuleType, sympy.Poly(sympy.Symbol('x') ** 2 + 1).degree())"
    )
    assert out == ["True", "2"]


def test_threads_wait_for_the_first_load():
    """Several threads touch sympy (through onnx-ir's symbolic dims and a from-import) at once:
    each waits for the one load and gets the real names, none sees a half-filled module."""
    out = _python(
        "import threading, graph_tools, onnx_ir as ir; errors = []; barrier = threading.Barrier(6)\n"
        "def dims():\n"
        "    barrier.wait()\n"
        "    try: assert str(ir.SymbolicDim('n') + 1) == 'n + 1'\n"
        "    except Exception as e: errors.append(repr(e))\n"
        "def names():\n"
        "    barrier.wait()\n"
        "    try:\n"
        "        from sympy import Rational; assert Rational(1, 2) * 2 == 1\n"
        "    except Exception as e: errors.append(repr(e))\n"
        "threads = [threading.Thread(target=f) for f in (dims, names) * 3]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "print(len(errors), errors)"
    )
    assert out == ["0", "[]"]


def test_dir_and_parent_attribute_after_load():
    out = _python(
        "import graph_tools, sympy, onnx_ir; print('Symbol' in dir(sympy)); "
        "onnx_ir.SymbolicDim('n') + 1; print(onnx_ir._symbolic_shapes.__name__)"
    )
    assert out == ["True", "onnx_ir._symbolic_shapes"]
