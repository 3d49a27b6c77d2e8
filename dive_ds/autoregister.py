"""Register "dive_moe" with transformers' Auto classes the moment transformers is imported.

`import dive_ds` must stay cheap (the CLI answers `--help` without torch), yet
`import dive_ds; AutoModelForCausalLM.from_pretrained(moe_folder)` must keep working. So:
- transformers already imported: register now;
- otherwise a one-shot import hook waits for the first `import transformers` (by anyone) and
  registers right after transformers' own module has run.
The hook also follows dive_ds.models.moe: when that module is what imports transformers first, it is
only half made when transformers finishes, so registration waits for the end of the model module.
(models/moe.py does not register itself: it is also the portable checkpoints' modeling file, which
must not register anything in a process without dive_ds.)
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

_MODEL = "dive_ds.models.moe"
_WATCHED = ("transformers", _MODEL)


def _register() -> None:
    moe = sys.modules.get(_MODEL)
    if moe is not None and not hasattr(moe, "register"):
        return  # half made: the hook on its loader registers when it is done
    importlib.import_module(_MODEL).register()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of the watched modules so registration follows them."""

    def find_spec(self, name, path=None, target=None):
        if name not in _WATCHED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        if name == _MODEL:
            uninstall()  # transformers comes with it
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _register()

        spec.loader.exec_module = exec_module  # this spec's own loader instance
        return spec


_HOOK = _AfterImport()


def install() -> None:
    """Register now if transformers is loaded, else once it is (idempotent)."""
    if "transformers" in sys.modules:
        _register()
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


def uninstall() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)
