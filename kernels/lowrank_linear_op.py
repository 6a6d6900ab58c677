"""The ``lowrank_infer::lowrank_linear`` op: fake implementation, registration, public functions.

vLLM's file-per-op order (kernel, launcher, fake, registration, public function) split in
two: the ``@triton.jit`` kernels and their launcher live in ``triton_lowrank``, imported on
first use, so that importing this package needs neither Triton nor a GPU.

On CUDA the op runs one of the backends in :data:`BACKENDS` (:func:`set_backend`):

* ``"cublas"`` (default): two cuBLAS GEMMs, ``(x @ V) @ U.T``, the intermediate rounded to the
  model dtype. The default because it was the fastest backend overall on the H100 and H200 we
  measured (benchmarks/results/h100/, benchmarks/results/h200/).
* ``"triton"``: hybrid: the Triton decode kernels up to ``DECODE_MAX_TOKENS`` tokens, where
  the weights' bytes bound the time, and the two cuBLAS GEMMs of ``"cublas"`` above, where the
  GEMMs run at full tensor-core rate with a 16-bit intermediate and the Triton prefill kernels,
  which keep it in fp32, reach a fraction of that. So ``"triton"`` is never slower than cuBLAS
  on prefill. The crossover is ``DECODE_MAX_TOKENS`` (32); on the H200 the decode kernels won
  only up to 16 tokens and only on the large projections.
* ``"triton_fp32"``: the Triton kernels at every token count, the intermediate never rounded
  to 16 bits.
* ``"torch"``: plain torch math with an fp32 intermediate, what CPU tensors always run; a
  baseline for the benchmarks.
"""

import contextlib
import os
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from lowrank_infer.kernels.launch_config import DECODE_MAX_TOKENS
from lowrank_infer.kernels.reference import torch_lowrank_linear, two_matmul_linear
from lowrank_infer.kernels.validation import check_factors, check_input

__all__ = [
    "BACKENDS",
    "get_backend",
    "get_pdl",
    "lowrank_linear",
    "set_backend",
    "set_pdl",
    "triton_lowrank_linear",
    "use_backend",
]


def _triton_launcher():
    """The launcher module; a plain ImportError with the fix if Triton is not installed."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "triton_lowrank_linear needs Triton: pip install 'lowrank-infer[triton]' "
            "(lowrank_linear still runs the torch implementation on CPU)") from err
    from lowrank_infer.kernels import triton_lowrank

    return triton_lowrank


def _triton(x, U, V, bias):
    return _triton_launcher().launch(x, U, V, bias)


def _hybrid(x, U, V, bias):
    if x.numel() // x.shape[-1] > DECODE_MAX_TOKENS:
        return two_matmul_linear(x, U, V, bias)
    return _triton(x, U, V, bias)


_CUDA_IMPLEMENTATIONS = {
    "cublas": two_matmul_linear, "triton": _hybrid, "triton_fp32": _triton, "torch": torch_lowrank_linear,
}
BACKENDS = tuple(_CUDA_IMPLEMENTATIONS)
_ENV_VAR = "LOWRANK_INFER_BACKEND"


def _backend_from_env() -> str:
    # Read once, at import: a typo should fail loudly before any model runs, and the op
    # should not re-read the environment on every call.
    name = os.environ.get(_ENV_VAR, "cublas")
    if name not in BACKENDS:
        raise ValueError(f"{_ENV_VAR}={name!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    return name


_backend = _backend_from_env()


def set_backend(name: str) -> None:
    """Choose what ``lowrank_linear`` runs on CUDA tensors (one of :data:`BACKENDS`).

    The default comes from ``$LOWRANK_INFER_BACKEND`` (else ``"cublas"``), read at import.
    The op looks the backend up on every call, so eager and ``torch.compile``d models follow a
    change at once; a captured CUDA graph replays the kernels of the backend that was active
    when it was captured.

    Args:
        name: ``"cublas"``, ``"triton"``, ``"triton_fp32"`` or ``"torch"``.

    Raises:
        ValueError: ``name`` is not one of :data:`BACKENDS`.
    """
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    """The CUDA backend of ``lowrank_linear`` (see :func:`set_backend`)."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """:func:`set_backend` for the duration of a ``with`` block; the previous backend comes back after.

    Args:
        name: ``"cublas"``, ``"triton"``, ``"triton_fp32"`` or ``"torch"``.

    Raises:
        ValueError: ``name`` is not one of :data:`BACKENDS`.
    """
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


_pdl = os.environ.get("LOWRANK_INFER_PDL", "0") == "1"


def set_pdl(enabled: bool) -> None:
    """Launch the Triton decode kernels with programmatic dependent launch (sm_90 and newer).

    With PDL a kernel starts while the previous one in the stream finishes: it prefetches its
    weights into L2 and waits (``griddepcontrol.wait``) only before it reads the activations.
    Off by default (``$LOWRANK_INFER_PDL=1`` turns it on at import): on the H200 it made every
    decode case slower (benchmarks/results/h200/). Ignored on GPUs older than sm_90 and in the
    interpreter.
    """
    global _pdl
    _pdl = bool(enabled)


def get_pdl() -> bool:
    """Whether the Triton decode kernels launch with PDL (see :func:`set_pdl`)."""
    return _pdl


def _lowrank_linear_fake(x, U, V, bias):
    return x.new_empty((*x.shape[:-1], U.shape[0]))


@torch.library.custom_op("lowrank_infer::lowrank_linear", mutates_args=())
def _lowrank_linear_op(
    x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    # Default implementation (CPU and any device without a registered kernel).
    return torch_lowrank_linear(x, U, V, bias)


@_lowrank_linear_op.register_kernel("cuda")
def _lowrank_linear_cuda(x, U, V, bias):
    return _CUDA_IMPLEMENTATIONS[_backend](x, U, V, bias)


_lowrank_linear_op.register_fake(_lowrank_linear_fake)


def _setup_context(ctx, inputs, output):
    x, U, V, _ = inputs
    ctx.save_for_backward(x, U, V)


def _backward(ctx, grad_y):
    # Plain torch math in fp32, like the forward's intermediate; z = x @ V is recomputed
    # rather than saved because it is cheap next to the GEMMs below.
    x, U, V = ctx.saved_tensors
    need_x, need_u, need_v, need_bias = ctx.needs_input_grad
    g = grad_y.reshape(-1, U.shape[0]).float()
    x2d = x.reshape(-1, V.shape[0]).float()
    grad_z = g @ U.float()
    grad_x = (grad_z @ V.float().T).reshape(x.shape).to(x.dtype) if need_x else None
    grad_u = (g.T @ (x2d @ V.float())).to(U.dtype) if need_u else None
    grad_v = (x2d.T @ grad_z).to(V.dtype) if need_v else None
    grad_bias = g.sum(0).to(grad_y.dtype) if need_bias else None
    return grad_x, grad_u, grad_v, grad_bias


_lowrank_linear_op.register_autograd(_backward, setup_context=_setup_context)


def lowrank_linear(
    x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``y = (x @ V) @ U.T + bias``: on CUDA the backend of :func:`set_backend`, torch elsewhere.

    Registered as ``torch.ops.lowrank_infer.lowrank_linear`` with a fake implementation and
    an autograd formula, so ``torch.compile(fullgraph=True)``, CUDA graphs and fine-tuning
    work through it. Only ``x`` is checked here, on every call; check the factors once with
    :func:`~lowrank_infer.kernels.check_factors` (``LowRankLinear`` does when it is built).

    Args:
        x: ``[..., n]`` activations (float16, bfloat16 or float32).
        U: ``[m, k]`` left factor, same dtype and device as ``x`` (under ``torch.autocast``, all
            four are cast to its dtype, as for ``F.linear``).
        V: ``[n, k]`` right factor, same dtype and device as ``x``.
        bias: optional ``[m]``, same dtype and device as ``x``.

    Returns:
        ``[..., m]`` in ``x``'s dtype.

    Raises:
        ValueError: ``x``'s last dim, dtype or device does not fit ``V``.
    """
    if _autocast_on(x):
        x, U, V, bias = _autocast(x, U, V, bias)
        if x.dtype == torch.bfloat16:
            check_input(x, V)
            return _two_autocast_linears(x, U, V, bias)
    check_input(x, V)
    if x.is_cpu and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # The op would run this same math; skipping the dispatcher saves most of the
        # per-call Python time of an eager CPU layer (benchmarks/layer_overhead.py).
        return torch_lowrank_linear(x, U, V, bias)
    return _lowrank_linear_op(x, U, V, bias)


def _autocast_on(x: torch.Tensor) -> bool:
    # The any-device flag first: one cheap call on this hot path when autocast is off (the common case).
    return (torch._C._is_any_autocast_enabled() and torch.amp.is_autocast_available(x.device.type)
            and torch.is_autocast_enabled(x.device.type))


def _two_autocast_linears(x, U, V, bias):
    """``(x @ V) @ U.T`` as two linears under autocast, the intermediate in bfloat16 (whose range is
    float32's), as ARA's masked layers and refinement's stand-ins compute: healing's low-rank layers
    then run on the bfloat16 matrix units with float32 accumulation, backward included, where the
    op's float32 intermediate ran a CPU's low-rank matmuls, and every backward, in float32
    (``benchmarks/heal_step.py``; ``benchmarks/results/cpu/heal_step_smollm2.txt``)."""
    return F.linear(x @ V, U, bias)


def _autocast(x, U, V, bias):
    """Everything in the autocast dtype, as autocast gives ``F.linear`` (it casts no custom op's
    arguments); the casts are differentiable, so float32 factors still get their gradients."""
    dtype = torch.get_autocast_dtype(x.device.type)
    return tuple(t if t is None else t.to(dtype) for t in (x, U, V, bias))


def triton_lowrank_linear(
    x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``y = (x @ V) @ U.T + bias`` with the Triton kernels, whatever the device.

    CUDA tensors run compiled kernels; CPU tensors run under the Triton interpreter, which
    needs ``TRITON_INTERPRET=1`` set before Triton is imported (tests). Arguments and result
    as :func:`lowrank_linear`; here the factors are checked on every call too.

    Raises:
        ValueError: shapes, dtypes or devices do not fit together.
        ImportError: Triton is not installed.
    """
    check_factors(U, V, bias)
    check_input(x, V)
    return _triton(x, U, V, bias)


def triton_grouped_linear(
    x: torch.Tensor, V: torch.Tensor, Us: list[torch.Tensor], bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """:func:`~lowrank_infer.kernels.lowrank_grouped_linear` with the Triton kernels, whatever the
    device (CPU tensors under ``TRITON_INTERPRET=1``): one shrink over ``V``, one expand per ``U``.

    Raises:
        ValueError: shapes, dtypes or devices do not fit together.
        ImportError: Triton is not installed.
    """
    from lowrank_infer.kernels.grouped_op import check_grouped

    for U in Us:
        check_factors(U, V[:, :U.shape[1]])
    check_input(x, V)
    check_grouped(V, Us, bias)
    return _triton_launcher().launch_grouped(x, V, Us, bias)


def triton_gated_linear(
    x: torch.Tensor, V: torch.Tensor, U_gate: torch.Tensor, U_up: torch.Tensor,
    up_start: Optional[int] = None, activation: str = "silu",
) -> torch.Tensor:
    """:func:`~lowrank_infer.kernels.lowrank_gated_linear` with the Triton kernels, whatever the
    device (CPU tensors under ``TRITON_INTERPRET=1``).

    Raises:
        ValueError: shapes, dtypes or devices do not fit together.
        ImportError: Triton is not installed.
    """
    from lowrank_infer.kernels.gated_op import check_gated

    up_start = U_gate.shape[1] if up_start is None else up_start
    check_input(x, V)
    check_gated(V, U_gate, U_up, up_start, activation)
    return _triton_launcher().launch_gated(x, V, U_gate, U_up, up_start, activation)
