"""When ``quant_method="grace"`` is registered with transformers: as soon as transformers' quantizer registry exists.

``import grace_quant`` must register the quantizer (a GRACE checkpoint then loads with plain ``from_pretrained``),
yet must not import transformers (``grace_quant.kernels`` and the CLI's ``--help`` stay light). The registry lives
in the package ``transformers.quantizers``, which every ``from_pretrained`` imports before it reads it. So: if that
package is already loaded, import the HF glue (``grace_quant.integrations``, which registers itself) now;
otherwise put a one-shot finder on ``sys.meta_path`` that lets the package load normally and then imports the glue.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType

REGISTRY_PACKAGE = "transformers.quantizers"
GLUE = "grace_quant.integrations"


def _import_glue() -> None:
    # If the glue itself is mid-import (it is what pulled transformers.quantizers in), this returns the partly
    # initialised module and the glue registers itself when its own import finishes.
    importlib.import_module(GLUE)


def register_when_transformers_loads() -> None:
    """Register now if transformers' quantizer registry is loaded, else right after it loads."""
    if REGISTRY_PACKAGE in sys.modules:
        _import_glue()
    elif not any(isinstance(finder, _AfterRegistryLoads) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterRegistryLoads())


class _AfterRegistryLoads(importlib.abc.MetaPathFinder):
    """Finds ``transformers.quantizers`` with the other finders and wraps its loader to import the glue after it."""

    def find_spec(self, fullname: str, path=None, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname != REGISTRY_PACKAGE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _ThenImportGlue(spec.loader, self)
                return spec
        return None


class _ThenImportGlue(importlib.abc.Loader):
    """Runs the real loader, then (once it succeeded) removes the finder and imports the glue."""

    def __init__(self, loader: importlib.abc.Loader, finder: _AfterRegistryLoads):
        self.loader, self.finder = loader, finder

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)
        _import_glue()
