"""Code we copied from libraries must not drift from them unnoticed.

- exporters/peft_export.py ``_optimize`` copies onnxscript's ``optimize_ir`` pass list (minus the
  passes that would merge our LoRA scales and weights). An onnxscript upgrade that changes that list
  fails here, loudly, until the copy is reviewed.
- graph_tools/adapters/peft_checkpoint.py copies PEFT rules (the ``rank_pattern``/``alpha_pattern``
  key match, the fields PEFT tags as forward-changing variants, the embedding layer names) so that
  ``convert`` need not import peft; each copy is compared with peft's own (needs the [export] extra).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
from pathlib import Path

import pytest

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
    """Source of ``exporters.peft_export._optimize``, read without importing exporters (torch)."""
    source = (ROOT / "exporters" / "peft_export.py").read_text()
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "_optimize")
    return ast.get_source_segment(source, node)


def test_onnxscript_optimizer_pass_list_is_the_one_we_copied():
    from onnxscript.optimizer import _optimizer

    upstream = _pass_calls(_optimizer.optimize_ir)
    # optimize_ir builds the list, then prepends InlinePass: put it first as it runs
    upstream = ["InlinePass"] + [n for n in upstream if n != "InlinePass"]
    assert upstream == ONNXSCRIPT_OPTIMIZE_IR, (
        "onnxscript changed optimize_ir's passes: review exporters/peft_export.py _optimize against it, "
        "then update ONNXSCRIPT_OPTIMIZE_IR"
    )


def test_our_optimizer_copy_is_upstream_minus_what_we_leave_out():
    assert _pass_calls_in(_our_optimize()) == [n for n in ONNXSCRIPT_OPTIMIZE_IR if n not in LEFT_OUT]


def _without_peft_loaded(monkeypatch):
    """Hide peft from sys.modules for this test (monkeypatch puts it back): the copies are used."""
    for name in [m for m in sys.modules if m == "peft" or m.startswith("peft.")]:
        monkeypatch.delitem(sys.modules, name)


@pytest.mark.torch
def test_copied_peft_rules_match_peft(monkeypatch):
    from peft import LoraConfig
    from peft.utils.constants import EMBEDDING_LAYER_NAMES
    from peft.utils.other import get_pattern_key

    from graph_tools.adapters import peft_checkpoint as pc

    assert pc._VARIANT_FIELDS == tuple(f.name for f in dataclasses.fields(LoraConfig) if f.metadata.get("is_lora_variant"))
    _without_peft_loaded(monkeypatch)
    assert tuple(pc._embedding_layer_names()) == tuple(EMBEDDING_LAYER_NAMES)
    ours = pc._get_pattern_key.__wrapped__()  # the copy: peft "not loaded"
    assert ours is not get_pattern_key
    patterns = ["q_proj", "layers.0.self_attn.v_proj", r"model\.layers\.1\..*", "k_proj|v_proj", "proj"]
    keys = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj",
            "model.layers.2.self_attn.k_proj", "model.layers.3.self_attn.o_proj", "lm_head", "xq_proj"]
    for key in keys:
        assert ours(patterns, key) == get_pattern_key(patterns, key), key
