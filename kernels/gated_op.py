"""``lowrank_infer::lowrank_gated_linear``: a gated MLP's gate and up projections, low-rank, with the
activation and product applied to their outputs: ``act(x V_g U_gᵀ) * (x V_u U_uᵀ)``.

One shrink ``z = x @ V`` serves both projections (``V`` holds their right factors side by side,
or one shared factor when a fused ``gate_up_proj`` was factorized as a whole); the gate reads
``z[..., :k_g]`` and the up projection ``z[..., up_start:up_start + k_u]``. Only the product, one
``[..., m]`` tensor, is written: the gate and up outputs never leave the kernel on the Triton
path. The intermediate follows :func:`~lowrank_infer.kernels.lowrank_linear`'s rules: float32 on
the CPU (and in the ``torch`` backend), the input dtype with cuBLAS, float32 in the Triton kernels.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from lowrank_infer.kernels.validation import check_input

__all__ = ["ACTIVATIONS", "lowrank_gated_linear"]

# Names as the kernels know them; transformers calls the second "gelu_pytorch_tanh" (Gemma).
ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda g: F.gelu(g, approximate="tanh"),
}


def torch_gated(x, V, U_gate, U_up, up_start: int, activation: str, fp32: bool) -> torch.Tensor:
    """Torch math of the op; ``fp32`` keeps every intermediate in float32 (CPU, oracle)."""
    dtype = x.dtype
    if fp32:
        x, V, U_gate, U_up = x.float(), V.float(), U_gate.float(), U_up.float()
    z = x @ V
    gate = F.linear(z[..., :U_gate.shape[1]], U_gate)
    up = F.linear(z[..., up_start:up_start + U_up.shape[1]], U_up)
    return (ACTIVATIONS[activation](gate) * up).to(dtype)


def _triton_or_cublas(x, V, U_gate, U_up, up_start, activation):
    from lowrank_infer.kernels.lowrank_linear_op import DECODE_MAX_TOKENS, get_backend

    backend = get_backend()
    if backend == "torch":
        return torch_gated(x, V, U_gate, U_up, up_start, activation, fp32=True)
    tokens = x.numel() // x.shape[-1]
    if backend == "triton_fp32" or (backend == "triton" and tokens <= DECODE_MAX_TOKENS):
        from lowrank_infer.kernels.triton_lowrank import launch_gated

        return launch_gated(x, V, U_gate, U_up, up_start, activation)
    return torch_gated(x, V, U_gate, U_up, up_start, activation, fp32=False)


@torch.library.custom_op("lowrank_infer::lowrank_gated_linear", mutates_args=())
def _gated_op(x: torch.Tensor, V: torch.Tensor, U_gate: torch.Tensor, U_up: torch.Tensor,
              up_start: int, activation: str) -> torch.Tensor:
    return torch_gated(x, V, U_gate, U_up, up_start, activation, fp32=True)


@_gated_op.register_kernel("cuda")
def _gated_cuda(x, V, U_gate, U_up, up_start, activation):
    return _triton_or_cublas(x, V, U_gate, U_up, up_start, activation)


@_gated_op.register_fake
def _gated_fake(x, V, U_gate, U_up, up_start, activation):
    return x.new_empty((*x.shape[:-1], U_gate.shape[0]))


def check_gated(V, U_gate, U_up, up_start: int, activation: str) -> None:
    """Raise ``ValueError`` naming the problem when the factors of a gated pair do not fit."""
    k_gate, k_up = U_gate.shape[1], U_up.shape[1]
    problem = None
    if activation not in ACTIVATIONS:
        problem = f"activation {activation!r} is not one of {sorted(ACTIVATIONS)}"
    elif U_gate.shape[0] != U_up.shape[0]:
        problem = f"gate and up must have the same rows, got {U_gate.shape[0]} and {U_up.shape[0]}"
    elif k_gate > V.shape[1] or up_start < 0 or up_start + k_up > V.shape[1]:
        problem = f"gate columns [0, {k_gate}) and up columns [{up_start}, {up_start + k_up}) must lie in V's {V.shape[1]}"
    elif not U_gate.dtype == U_up.dtype == V.dtype or not U_gate.device == U_up.device == V.device:
        problem = "U_gate, U_up and V need one dtype and one device"
    if problem is not None:
        raise ValueError(f"lowrank_gated_linear: {problem} (V {list(V.shape)}, U_gate "
                         f"{list(U_gate.shape)} {U_gate.dtype}, U_up {list(U_up.shape)} {U_up.dtype})")


def lowrank_gated_linear(
    x: torch.Tensor, V: torch.Tensor, U_gate: torch.Tensor, U_up: torch.Tensor,
    up_start: Optional[int] = None, activation: str = "silu",
) -> torch.Tensor:
    """``act(x V_g U_gᵀ) * (x V_u U_uᵀ)``: a gated MLP's hidden state from low-rank gate and up.

    Args:
        x: ``[..., n]`` activations.
        V: ``[n, K]`` right factors: the gate's in columns ``[0, k_g)``, the up projection's in
            ``[up_start, up_start + k_u)``.
        U_gate: ``[m, k_g]`` left factor of the gate projection.
        U_up: ``[m, k_u]`` left factor of the up projection.
        up_start: first column of the up projection's factor in ``V`` (default ``k_g``: side by
            side; ``0`` when both projections share one factor, as a factorized fused
            ``gate_up_proj`` does).
        activation: ``"silu"`` (Llama, Qwen, Mistral) or ``"gelu_tanh"`` (Gemma).

    Returns:
        ``[..., m]`` in ``x``'s dtype.

    Raises:
        ValueError: ``x`` does not fit ``V``, or the factors do not fit each other.
    """
    up_start = U_gate.shape[1] if up_start is None else up_start
    check_input(x, V)
    check_gated(V, U_gate, U_up, up_start, activation)
    if x.is_cpu and not torch.compiler.is_compiling():
        return torch_gated(x, V, U_gate, U_up, up_start, activation, fp32=True)
    return _gated_op(x, V, U_gate, U_up, up_start, activation)
