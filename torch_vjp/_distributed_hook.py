"""Registers torch_vjp's DTensor sharding rules (torch_vjp.distributed) as soon as torch.distributed.tensor is
imported, without importing it (a second or more) for the many users who never use DTensor: a one-shot import
hook on torch.distributed.tensor, or the registration at once where it is already imported."""
import importlib.abc
import importlib.machinery
import sys
import warnings

_TARGET = "torch.distributed.tensor"


def _register() -> None:
    try:
        from . import distributed  # noqa: F401
    except Exception as error:  # never break the user's import of torch.distributed.tensor
        warnings.warn(f"torch_vjp: DTensor sharding rules not registered: {error!r}", RuntimeWarning, stacklevel=2)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_and_register
        return spec


def install() -> None:
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
