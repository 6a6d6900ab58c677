"""The ``lowrank_infer::lowrank_linear`` op: fake implementation, registration, public functions.

vLLM's file-per-op order (kernel, launcher, fake, registration, public function) split in
two: the ``@triton.jit`` kernels and their launcher live in ``triton_lowrank``, imported on
first use, so that importing this package needs neither Triton nor a GPU.

On CUDA the op runs one of two backends (:func:`set_backend`):

* ``"cublas"`` (default): two cuBLAS GEMMs, ``(x @ V) @ U.T``, the intermediate rounded to the
  model dtype. Measured on an H100 with 16-aligned ranks (benchmarks/results/h100/aligned/) it
  is the fastest: LLaMA-2-7B at keep 0.6 decodes 1.13x and prefills 1.28x faster than dense,
  where the Triton kernels reach 1.00x and 0.54x.
* ``"triton"``: the Triton kernels, with an fp32 intermediate (never rounded to 16 bits).
"""

import os
from typing import Optional

import torch

from lowrank_infer.kernels.reference import torch_lowrank_linear, two_matmul_linear
from lowrank_infer.kernels.validation import check_lowrank_inputs

__all__ = ["BACKENDS", "get_backend", "lowrank_linear", "set_backend", "triton_lowrank_linear"]

BACKENDS = ("cublas", "triton")
_backend = os.environ.get("LOWRANK_INFER_BACKEND", "cublas")


def set_backend(name: str) -> None:
    """Choose what ``lowrank_linear`` runs on CUDA tensors: ``"cublas"`` or ``"triton"``.

    The default comes from ``$LOWRANK_INFER_BACKEND`` (else ``"cublas"``). The op reads it on
    every call, so eager and ``torch.compile``d models follow a change at once; a captured CUDA
    graph replays the kernels of the backend that was active when it was captured.
    """
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    """The CUDA backend of ``lowrank_linear`` (see :func:`set_backend`)."""
    if _backend not in BACKENDS:
        raise ValueError(f"LOWRANK_INFER_BACKEND={_backend!r}; choose one of {', '.join(BACKENDS)}")
    return _backend


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
    if get_backend() == "triton":
        return _triton_launcher().launch(x, U, V, bias)
    return two_matmul_linear(x, U, V, bias)


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
    work through it.

    Args:
        x: ``[..., n]`` activations (float16, bfloat16 or float32).
        U: ``[m, k]`` left factor, same dtype and device as ``x``.
        V: ``[n, k]`` right factor, same dtype and device as ``x``.
        bias: optional ``[m]``, same dtype and device as ``x``.

    Returns:
        ``[..., m]`` in ``x``'s dtype.

    Raises:
        ValueError: shapes, dtypes or devices do not fit together.
    """
    check_lowrank_inputs(x, U, V, bias)
    return _lowrank_linear_op(x, U, V, bias)


def triton_lowrank_linear(
    x: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    _path: Optional[str] = None,
    _out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``y = (x @ V) @ U.T + bias`` with the Triton kernels, whatever the device.

    CUDA tensors run compiled kernels; CPU tensors run under the Triton interpreter, which
    needs ``TRITON_INTERPRET=1`` set before Triton is imported (tests). ``_path`` (one of
    ``launch_config.PATHS``) and ``_out`` (a preallocated ``[..., m]`` result) are test hooks.

    Args:
        x: ``[..., n]`` activations (float16, bfloat16 or float32).
        U: ``[m, k]`` left factor, same dtype and device as ``x``.
        V: ``[n, k]`` right factor, same dtype and device as ``x``.
        bias: optional ``[m]``, same dtype and device as ``x``.

    Returns:
        ``[..., m]`` in ``x``'s dtype.

    Raises:
        ValueError: shapes, dtypes or devices do not fit together.
        ImportError: Triton is not installed.
    """
    check_lowrank_inputs(x, U, V, bias)
    return _triton_launcher().launch(x, U, V, bias, path=_path, out=_out)
