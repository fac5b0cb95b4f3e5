"""When ``quant_method="grace"`` is registered with transformers: as soon as transformers' quantizer registry exists.

``import grace_quant`` must register the quantizer (a GRACE checkpoint then loads with plain ``from_pretrained``),
yet must not import transformers (``grace_quant.kernels`` and the CLI's ``--help`` stay light). The registry lives
in the package ``transformers.quantizers``, which every ``from_pretrained`` imports before it reads it. So: if that
package is already loaded, import the HF glue (``grace_quant.integrations``, which registers itself) now;
otherwise put a one-shot finder on ``sys.meta_path`` that lets the package load normally and then imports the glue.
The attention function ``grace_decode`` (``grace_quant.integrations.attention``) is registered the same way, after
``transformers.modeling_utils`` (which defines ``AttentionInterface``) has loaded: that module is still importing
when it pulls in the quantizer registry, so the two hooks cannot be one.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType

REGISTRY_PACKAGE = "transformers.quantizers"
GLUE = "grace_quant.integrations"
ATTENTION_MODULE = "transformers.modeling_utils"
ATTENTION_GLUE = "grace_quant.integrations.attention"
HOOKS = {REGISTRY_PACKAGE: GLUE, ATTENTION_MODULE: ATTENTION_GLUE}
"""transformers module -> the glue module imported (which registers itself) once it has loaded."""


def _import_glue(glue: str = GLUE) -> None:
    # If the glue itself is mid-import (it is what pulled transformers.quantizers in), this returns the partly
    # initialised module and the glue registers itself when its own import finishes.
    importlib.import_module(glue)


def _loaded(name: str) -> bool:
    """``name`` is imported and its import has finished (not a module still executing its body)."""
    module = sys.modules.get(name)
    return module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False)


def register_when_transformers_loads() -> None:
    """Register now what transformers has loaded, the rest right after it loads."""
    pending = [name for name in HOOKS if not _loaded(name)]
    for name, glue in HOOKS.items():
        if name not in pending:
            _import_glue(glue)
    if pending and not any(isinstance(finder, _AfterRegistryLoads) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterRegistryLoads(pending))


class _AfterRegistryLoads(importlib.abc.MetaPathFinder):
    """Finds the hooked transformers modules with the other finders and wraps their loaders to import the glue
    after them; removes itself once every hook has fired."""

    def __init__(self, pending: list[str]):
        self.pending = set(pending)

    def find_spec(self, fullname: str, path=None, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname not in self.pending:
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
        self.finder.pending.discard(module.__name__)
        if not self.finder.pending and self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)
        _import_glue(HOOKS[module.__name__])
