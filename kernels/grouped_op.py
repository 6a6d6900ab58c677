"""``lowrank_infer::lowrank_grouped_linear``: several low-rank linears that read the same input
(q/k/v, gate/up) as one shrink over their concatenated right factors and one expand per linear.

``y = [z_1 @ U_1ᵀ | z_2 @ U_2ᵀ | …] + bias`` with ``[z_1 | z_2 | …] = x @ [V_1 | V_2 | …]``:
one GEMM reads ``x`` once for every linear of the group, instead of one shrink each. The
intermediate follows :func:`~lowrank_infer.kernels.lowrank_linear`'s rules: float32 on the CPU
(and in the ``torch`` backend), the input dtype with cuBLAS, float32 in the Triton kernels (one
shrink over the concatenated factors, then one expand per linear into its slice of the output).
"""

from typing import List, Optional

import torch
import torch.nn.functional as F

from lowrank_infer.kernels.validation import check_input

__all__ = ["check_grouped", "lowrank_grouped_linear"]


def _grouped(x: torch.Tensor, V: torch.Tensor, Us: List[torch.Tensor], bias: Optional[torch.Tensor],
             fp32: bool) -> torch.Tensor:
    dtype = x.dtype
    if fp32:
        x, V, Us, bias = x.float(), V.float(), [U.float() for U in Us], None if bias is None else bias.float()
    z = x @ V
    pieces, start = [], 0
    for U in Us:
        pieces.append(F.linear(z[..., start:start + U.shape[1]], U))
        start += U.shape[1]
    y = torch.cat(pieces, dim=-1)
    if bias is not None:
        y = y + bias
    return y.to(dtype)


@torch.library.custom_op("lowrank_infer::lowrank_grouped_linear", mutates_args=())
def _grouped_op(x: torch.Tensor, V: torch.Tensor, Us: List[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _grouped(x, V, Us, bias, fp32=True)


@_grouped_op.register_kernel("cuda")
def _grouped_cuda(x, V, Us, bias):
    from lowrank_infer.kernels.lowrank_linear_op import DECODE_MAX_TOKENS, get_backend

    backend = get_backend()
    tokens = x.numel() // x.shape[-1]
    if backend == "triton_fp32" or (backend == "triton" and tokens <= DECODE_MAX_TOKENS):
        from lowrank_infer.kernels.triton_lowrank import launch_grouped

        return launch_grouped(x, V, Us, bias)
    return _grouped(x, V, Us, bias, fp32=backend == "torch")


@_grouped_op.register_fake
def _grouped_fake(x, V, Us, bias):
    return x.new_empty((*x.shape[:-1], sum(U.shape[0] for U in Us)))


def check_grouped(V: torch.Tensor, Us: List[torch.Tensor], bias: Optional[torch.Tensor]) -> None:
    """Raise ``ValueError`` naming the problem when the factors of a group do not fit together."""
    if sum(U.shape[1] for U in Us) != V.shape[1] or any(U.dtype != V.dtype for U in Us):
        raise ValueError(f"lowrank_grouped_linear: left factors of ranks {[U.shape[1] for U in Us]} "
                         f"({[str(U.dtype) for U in Us]}) do not fit V {tuple(V.shape)} ({V.dtype})")
    if bias is not None and (bias.shape != (sum(U.shape[0] for U in Us),) or bias.dtype != V.dtype):
        raise ValueError(f"lowrank_grouped_linear: bias {list(bias.shape)} ({bias.dtype}) must be "
                         f"[{sum(U.shape[0] for U in Us)}] in {V.dtype}")


def lowrank_grouped_linear(
    x: torch.Tensor, V: torch.Tensor, Us: List[torch.Tensor], bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The outputs of the low-rank linears ``U_i·V_iᵀ`` on the same ``x``, concatenated.

    Args:
        x: ``[..., n]`` activations.
        V: ``[n, k_1 + k_2 + …]``: the right factors side by side, in the order of ``Us``.
        Us: ``[m_i, k_i]`` left factors.
        bias: optional ``[m_1 + m_2 + …]``.

    Raises:
        ValueError: ``x`` does not fit ``V``, or the ``Us``' ranks do not add up to ``V``'s columns.
    """
    check_input(x, V)
    check_grouped(V, Us, bias)
    if x.is_cpu and not torch.compiler.is_compiling():
        return _grouped(x, V, Us, bias, fp32=True)  # what the op runs, without the dispatcher's cost
    return _grouped_op(x, V, Us, bias)
