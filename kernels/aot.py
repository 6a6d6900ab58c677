"""Compile the Triton kernels ahead of time for a GPU that is not here (sm_90 by default).

Triton's NVIDIA backend and the ``ptxas``/``cuobjdump`` bundled in its wheel build a cubin for
any target on a CPU-only machine, so register spills and shared memory can be checked in CI.
The launcher's own path runners run on ``meta`` tensors with the ``@triton.jit`` kernels
swapped for recorders; each recorded launch is specialized by Triton's binder exactly as a
launch on the GPU would be (sizes equal to 1 become constants, multiples of 16 get divisibility
hints), then compiled. Import this module without ``TRITON_INTERPRET=1``, which makes the
kernels interpreted functions that cannot be compiled.

    echo '[{"path": "decode", "T": 1, "m": 4096, "n": 4096, "k": 1228}]' \\
        | python -m lowrank_infer.kernels.aot
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from lowrank_infer.kernels import triton_lowrank
from lowrank_infer.kernels.launch_config import get_config

__all__ = ["GATED_PATHS", "H100", "H200", "SM90", "SM90_MAX_SHARED_BYTES", "compile_case", "tools_missing"]

SM90 = GPUTarget("cuda", 90, 32)
# Largest shared memory one block may opt in to on sm_90 (228 KB per SM less 1 KB reserved).
SM90_MAX_SHARED_BYTES = 227 * 1024
H100 = {"device_name": "NVIDIA H100 80GB HBM3", "num_sms": 132}
H200 = {"device_name": "NVIDIA H200", "num_sms": 132}

_JIT_KERNELS = ("_matmul_kernel", "_prefill_kernel", "_reduce_kernel", "_decode_shrink_kernel",
                "_decode_expand_kernel")
# Paths beyond launch_config.PATHS: the gated MLP's decode (shrink over gate and up, one expand
# with the activation; k is each projection's rank).
GATED_PATHS = {"decode_gated_silu": "silu", "decode_gated_gelu_tanh": "gelu_tanh"}
_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def tools_missing() -> str | None:
    """Why ahead-of-time compilation cannot run here (no bundled ptxas or cuobjdump), else None."""
    try:
        get_ptxas(SM90.arch)
        triton.knobs.nvidia.cuobjdump
    except RuntimeError as err:  # Triton's message: "Cannot find <tool>"
        return str(err)
    return None


def compile_case(
    path: str, T: int, m: int, n: int, k: int, dtype: str = "float16", *, bias: bool = False,
    pdl: bool = False, device_name: str = H100["device_name"], num_sms: int = H100["num_sms"],
    target: GPUTarget = SM90,
) -> list[dict]:
    """Compile every kernel that ``triton_lowrank.launch`` runs for one layer shape on one path.

    Args:
        path: one of ``launch_config.PATHS``, or of :data:`GATED_PATHS` (a gated MLP's gate and
            up projections at decode, each of rank ``k``).
        T: tokens; ``m``, ``n``, ``k``: the layer's out features, in features and rank.
        dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"``.
        bias: whether the layer has a bias.
        pdl: compile the decode kernels for programmatic dependent launch.
        device_name: GPU whose tuned table supplies the configs; a name without a table gets
            the heuristics. ``num_sms``: its SM count, which the heuristics read.
        target: what to compile for.

    Returns:
        One dict per launch, in launch order: ``kernel`` (the config's kernel name, with
        ``.reduce`` for a split-K reduction), ``config`` (the constexprs and launch options),
        ``n_regs``, ``n_spills`` (local memory per thread in 4-byte words, as Triton counts them),
        ``shared`` (bytes of shared memory per block), ``uses_wgmma``, ``uses_mma_sync``,
        ``uses_griddepcontrol``, ``prefetches_l2``.
    """
    launches = _record_launches(path, T, m, n, k, getattr(torch, dtype), bias, pdl, device_name, num_sms)
    return [{"kernel": name, "config": kwargs, **_compile(fn, args, kwargs, target)}
            for name, fn, args, kwargs in launches]


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, fn, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


@contextlib.contextmanager
def _recording(launches: list, pdl: bool):
    saved = {name: getattr(triton_lowrank, name) for name in (*_JIT_KERNELS, "_use_pdl")}
    try:
        for name in _JIT_KERNELS:
            setattr(triton_lowrank, name, _Recorder(saved[name], launches))
        triton_lowrank._use_pdl = lambda device: pdl
        yield
    finally:
        for name, fn in saved.items():
            setattr(triton_lowrank, name, fn)


def _gated_runner(activation):
    def run(x, U, V, bias, out, cfgs, precision):
        z = triton_lowrank._decode_shrink(x, V.T, cfgs["decode_shrink"], precision)
        half = U.shape[1] // 2
        triton_lowrank._decode_expand(z[:, :half], U[:, :half], None, out, cfgs["decode_expand"],
                                      precision, (z[:, half:], U[:, half:]), activation)

    return run, ("decode_shrink", "decode_expand")


def _record_launches(path, T, m, n, k, dtype, bias, pdl, device_name, num_sms):
    """``(config kernel name, jit function, args, kwargs)`` of each launch the path makes."""
    runner, kernels = (_gated_runner(GATED_PATHS[path]) if path in GATED_PATHS
                       else triton_lowrank._PATHS[path])
    elem_bytes = torch.empty((), dtype=dtype).element_size()
    cfgs = {kernel: get_config(kernel, T, m, n, k, device_name=device_name, num_sms=num_sms,
                               elem_bytes=elem_bytes) for kernel in kernels}
    # A gated pair: gate and up side by side, each of rank k.
    k_all = 2 * k if path in GATED_PATHS else k
    meta = {"device": "meta", "dtype": dtype}
    x, U, V, out = torch.empty(T, n, **meta), torch.empty(m, k_all, **meta), \
        torch.empty(k_all, n, **meta).T, torch.empty(T, m, **meta)
    launches = []
    with _recording(launches, pdl):
        runner(x, U, V, torch.empty(m, **meta) if bias else None, out, cfgs,
               "ieee" if dtype == torch.float32 else "tf32")
    names, labelled = iter(kernels), []
    for fn, args, kwargs in launches:
        # A split GEMM's reduction follows it: name it after that GEMM.
        if fn is not triton_lowrank._reduce_kernel:
            gemm = next(names)
        labelled.append((gemm if fn is not triton_lowrank._reduce_kernel else f"{gemm}.reduce", fn, args, kwargs))
    return labelled


def _compile(fn, args, kwargs, target) -> dict:
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    _, specialization, options = binder(*args, **kwargs)
    return _compile_specialized(fn, tuple(specialization), tuple(sorted(options.items())), target)


@functools.lru_cache(maxsize=None)
def _compile_specialized(fn, specialization, options, target) -> dict:
    """Compile one specialization (cached: many shapes share one) and read its resources."""
    backend = make_backend(target)
    signature = {param.name: kind for param, (kind, _) in zip(fn.params, specialization)}
    constexprs = {(i,): value for i, (kind, value) in enumerate(specialization) if kind == "constexpr"}
    attrs = {(i,): backend.parse_attr(value) for i, (kind, value) in enumerate(specialization)
             if kind != "constexpr"}
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                              options=backend.parse_options(dict(options)).__dict__)
    regs, local = _resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    return {"n_regs": regs, "n_spills": local // 4, "shared": compiled.metadata.shared,
            "uses_wgmma": "wgmma.mma_async" in ptx, "uses_mma_sync": "mma.sync" in ptx,
            "uses_griddepcontrol": "griddepcontrol.wait" in ptx, "prefetches_l2": "prefetch.global.L2" in ptx}


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, local memory bytes) per thread, from ``cuobjdump -res-usage``.

    Local memory is the stack frame (where ptxas puts spilled registers) plus any other local
    memory: what the driver reports as a function's local size, which Triton divides by 4
    into ``n_spills``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "kernel.cubin"
        file.write_bytes(cubin)
        report = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", str(file)],
                                check=True, capture_output=True, text=True).stdout
    usage = _RES_USAGE.search(report)
    if usage is None:
        raise RuntimeError(f"unexpected cuobjdump -res-usage output:\n{report}")
    return int(usage[1]), int(usage[2]) + int(usage[4])


def main() -> int:
    """Read a JSON list of :func:`compile_case` keyword dicts on stdin; write each with its results."""
    cases = json.load(sys.stdin)
    json.dump([dict(case, launches=compile_case(**case)) for case in cases], sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
