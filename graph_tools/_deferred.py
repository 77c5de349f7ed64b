"""sympy is imported on first use, not when onnx-ir is imported.

onnx-ir imports sympy at module level (``onnx_ir/_core.py``; ``onnx_ir/_symbolic_shapes.py``
builds a table of sympy functions at import) but needs it only for arithmetic on symbolic
dimensions (``SymbolicDim + 1``, ``.simplify()``, ``.evaluate()``), which graph_tools never does.
Importing sympy takes ~0.3 s, a fifth of a whole ``lora-onnx extract`` process, and tearing its
~500 modules down at exit more.

:func:`defer` (run by ``graph_tools/__init__`` before anything imports onnx-ir) puts a stand-in
module for ``sympy`` and for ``onnx_ir._symbolic_shapes`` into ``sys.modules``. Each is the very
module object the real import would make (same spec, ``__file__``); on the first lookup of a name
it does not hold yet (any sympy name, or ``__path__``, which importing a submodule reads), it runs
the real module code into itself and from then on is an ordinary module. Nothing is deferred when sympy or onnx-ir is already
imported, or when onnx-ir's layout is not the one this was written for (``_symbolic_shapes``).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import threading
import types

__all__ = ["defer", "DEFERRED"]

#: the modules :func:`defer` defers, in the order they are set up
DEFERRED = ("sympy", "onnx_ir._symbolic_shapes")

_LOCK = threading.RLock()


class _Deferred(types.ModuleType):
    """A module whose code runs on the first lookup of a name it does not hold yet."""

    def __getattr__(self, name: str):  # only called when ordinary lookup fails
        with _LOCK:
            if type(self) is _Deferred:  # not loaded meanwhile by another thread
                self.__class__ = types.ModuleType
                spec = self.__spec__
                if spec.submodule_search_locations is not None:
                    self.__path__ = spec.submodule_search_locations
                try:
                    spec.loader.exec_module(self)
                except BaseException:
                    sys.modules.pop(self.__spec__.name, None)  # as a failed eager import leaves it
                    raise
        return getattr(self, name)


def _stand_in(spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
    module = importlib.util.module_from_spec(spec)  # __spec__, __path__, __file__, __loader__ ...
    # without __path__ until loaded: importing a submodule (``import sympy.polys``) reads the
    # parent's __path__, so the package's own code runs first, as with an eager import
    module.__dict__.pop("__path__", None)
    module.__class__ = _Deferred
    return module


def defer() -> bool:
    """Set up the stand-ins (see the module doc); True when they were set up."""
    with _LOCK:
        if any(name in sys.modules for name in ("sympy", "onnx_ir")):
            return False
        try:
            sympy = importlib.util.find_spec("sympy")
            onnx_ir = importlib.util.find_spec("onnx_ir")
            shapes = (importlib.machinery.PathFinder.find_spec("onnx_ir._symbolic_shapes", onnx_ir.submodule_search_locations)
                      if onnx_ir is not None and onnx_ir.submodule_search_locations else None)
        except (ImportError, ValueError):
            return False
        if sympy is None or shapes is None or sympy.loader is None or shapes.loader is None:
            return False
        sys.modules["sympy"] = _stand_in(sympy)
        sys.modules["onnx_ir._symbolic_shapes"] = _stand_in(shapes)
        return True
