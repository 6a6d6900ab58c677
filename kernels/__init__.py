"""Fused low-rank linear kernels and their dispatch (imported as ``lowrank_infer.kernels``).

Imported as bare ``kernels``, this folder is the wrong package: that happens when the source
checkout's root is on ``sys.path`` (``python -m ...`` run there), and transformers imports Hugging
Face's ``kernels`` package when it is installed (≥ 5.25 always installs it) and probes for it
otherwise. The module then hands the import over to the next ``kernels`` on ``sys.path``; when there
is none it stays empty, without ``__file__``, as the namespace package that a stray folder on
``sys.path`` would be (what transformers' probe takes for "not installed").
"""

if __name__ == "kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.realpath(_os.path.join(_os.path.dirname(__file__), _os.pardir))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.realpath(p or _os.curdir) != _root])
    if _spec is None:
        __path__ = []  # no submodules
        del __file__
    else:
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
        _spec.loader.exec_module(_module)
else:
    from lowrank_infer.cost import use_dense
    from lowrank_infer.kernels.gated_op import ACTIVATIONS, lowrank_gated_linear
    from lowrank_infer.kernels.grouped_op import lowrank_grouped_linear
    from lowrank_infer.kernels.lowrank_linear_op import (
        BACKENDS,
        get_backend,
        get_pdl,
        lowrank_linear,
        set_backend,
        set_pdl,
        triton_gated_linear,
        triton_grouped_linear,
        triton_lowrank_linear,
        use_backend,
    )
    from lowrank_infer.kernels.reference import torch_lowrank_linear, two_matmul_linear
    from lowrank_infer.kernels.validation import check_factors

    __all__ = [
        "ACTIVATIONS",
        "BACKENDS",
        "check_factors",
        "get_backend",
        "get_pdl",
        "lowrank_gated_linear",
        "lowrank_grouped_linear",
        "lowrank_linear",
        "set_backend",
        "set_pdl",
        "torch_lowrank_linear",
        "triton_gated_linear",
        "triton_grouped_linear",
        "triton_lowrank_linear",
        "two_matmul_linear",
        "use_backend",
        "use_dense",
    ]
