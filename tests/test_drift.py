"""Code we copied from libraries must not drift from them unnoticed.

- exporters/passes.py ``optimizer_passes`` copies onnxscript's ``optimize_ir`` pass list (minus the
  passes that would merge our LoRA scales and weights). An onnxscript upgrade that changes that list
  fails here, loudly, until the copy is reviewed.
- The PEFT rules we copied (pattern keys, variant fields, names, scaling) are compared with peft's
  own in tests/test_peft_rules.py.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: onnxscript 0.7.2 ``optimizer._optimizer.optimize_ir``: the passes, in order (inline first)
ONNXSCRIPT_OPTIMIZE_IR = [
    "InlinePass",
    "PassManager",
    "FoldConstantsPass",
    "RewritePass",
    "RemoveUnusedNodesPass",
    "RemoveUnusedFunctionsPass",
    "RemoveUnusedOpsetsPass",
    "RemoveUnusedNodesPass",
    "LiftConstantsToInitializersPass",
    "LiftSubgraphInitializersToMainGraphPass",
    "DeduplicateInitializersPass",
    "CommonSubexpressionEliminationPass",
    "OutputFixPass",
    "NameFixPass",
]
#: what our copy leaves out, and why
LEFT_OUT = {
    "DeduplicateInitializersPass": "would share one scale initializer between LoRA sites",
    "LiftSubgraphInitializersToMainGraphPass": "exported LoRA graphs have no subgraph initializers",
}


def _pass_calls(func) -> list[str]:
    """Names of the ``*Pass`` / ``PassManager`` constructors called in ``func``, in source order."""
    return _pass_calls_in(textwrap.dedent(inspect.getsource(func)))


def _pass_calls_in(source: str) -> list[str]:
    calls = sorted((n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call)), key=lambda n: (n.lineno, n.col_offset))
    names = [c.func.attr if isinstance(c.func, ast.Attribute) else getattr(c.func, "id", "") for c in calls]
    return [n for n in names if n.endswith("Pass") or n == "PassManager"]


def _our_optimize() -> str:
    """Source of ``exporters.passes.optimizer_passes``, read without importing exporters (torch)."""
    source = (ROOT / "exporters" / "passes.py").read_text()
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "optimizer_passes")
    return ast.get_source_segment(source, node)


def test_onnxscript_optimizer_pass_list_is_the_one_we_copied():
    from onnxscript.optimizer import _optimizer

    upstream = _pass_calls(_optimizer.optimize_ir)
    # optimize_ir builds the list, then prepends InlinePass: put it first as it runs
    upstream = ["InlinePass"] + [n for n in upstream if n != "InlinePass"]
    assert upstream == ONNXSCRIPT_OPTIMIZE_IR, (
        "onnxscript changed optimize_ir's passes: review exporters/passes.py optimizer_passes against it, "
        "then update ONNXSCRIPT_OPTIMIZE_IR"
    )


def test_our_optimizer_copy_is_upstream_minus_what_we_leave_out():
    assert _pass_calls_in(_our_optimize()) == [n for n in ONNXSCRIPT_OPTIMIZE_IR if n not in LEFT_OUT]
