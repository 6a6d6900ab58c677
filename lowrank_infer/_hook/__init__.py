"""Register lowrank_infer with transformers in programs that never import lowrank_infer.

Installed as the top-level package ``lowrank_infer_autoload``, with ``lowrank_infer-autoload.pth``
beside it in site-packages: Python runs that file at every start-up and it calls :func:`install`.
That must stay cheap, so :func:`install` imports nothing and only puts a finder at the front of
``sys.meta_path``. The first time a program imports ``transformers.quantizers`` (which
``from_pretrained`` needs), the finder lets that import complete and then imports
``lowrank_infer``, whose import registers the ``lowrank_infer`` quantization method. So
``AutoModelForCausalLM.from_pretrained(dir)`` — and lm-eval's ``--model hf``, which calls it —
loads a compressed checkpoint as if the program had imported lowrank_infer first.

``LOWRANK_INFER_AUTOLOAD=0`` switches this off; transformers then refuses compressed checkpoints
with an error that says what to do (``lowrank_infer.hf_quantizer.REFUSAL``).
"""

import os
import sys

TRIGGER = "transformers.quantizers"  # a package: it is complete once .auto and .base are
ENV = "LOWRANK_INFER_AUTOLOAD"

__all__ = ["ENV", "TRIGGER", "install"]


def _register() -> None:
    try:
        import lowrank_infer  # noqa: F401  (its import registers the quantization method)
    except Exception as err:  # the program imported transformers, not lowrank_infer: never break it
        import warnings

        warnings.warn(
            f"lowrank_infer could not be imported ({err!r}): transformers will refuse lowrank_infer "
            "checkpoints until it imports. Fix or uninstall lowrank-infer, or set "
            f"{ENV}=0 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )


class _RegisterAfter:
    """Loader wrapper: runs the real loader, then registers lowrank_infer."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        # Whoever inspects the module later (inspect, importlib.resources) sees its real loader.
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _register()


class _Finder:
    """Meta-path finder that only acts on the first import of :data:`TRIGGER`."""

    def find_spec(self, name, path=None, target=None):
        if name != TRIGGER:
            return None
        # Once is enough; leaving first also keeps the search below from finding this finder.
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisterAfter(spec.loader)
                return spec
        return None


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once; not when ``LOWRANK_INFER_AUTOLOAD=0``)."""
    if os.environ.get(ENV, "1") == "0":
        return
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
