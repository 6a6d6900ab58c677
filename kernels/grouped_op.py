"""``lowrank_infer::lowrank_grouped_linear``: several low-rank linears that read the same input
(q/k/v, gate/up) as one shrink over their concatenated right factors and one expand per linear.

``y = [z_1 @ U_1ᵀ | z_2 @ U_2ᵀ | …] + bias`` with ``[z_1 | z_2 | …] = x @ [V_1 | V_2 | …]``:
one GEMM reads ``x`` once for every linear of the group, instead of one shrink each. The
intermediate follows :func:`~lowrank_infer.kernels.lowrank_linear`'s rules: float32 on the CPU
(and in the ``torch`` backend), the input dtype on CUDA (two cuBLAS GEMMs per linear there).
A Triton grouped kernel is future work; every CUDA backend runs cuBLAS here.
"""

from typing import List, Optional

import torch
import torch.nn.functional as F

from lowrank_infer.kernels.validation import check_input

__all__ = ["lowrank_grouped_linear"]


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
    from lowrank_infer.kernels.lowrank_linear_op import get_backend

    return _grouped(x, V, Us, bias, fp32=get_backend() == "torch")


@_grouped_op.register_fake
def _grouped_fake(x, V, Us, bias):
    return x.new_empty((*x.shape[:-1], sum(U.shape[0] for U in Us)))


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
    if sum(U.shape[1] for U in Us) != V.shape[1] or any(U.dtype != V.dtype for U in Us):
        raise ValueError(f"lowrank_grouped_linear: left factors of ranks {[U.shape[1] for U in Us]} "
                         f"({[str(U.dtype) for U in Us]}) do not fit V {tuple(V.shape)} ({V.dtype})")
    if x.is_cpu and not torch.compiler.is_compiling():
        return _grouped(x, V, Us, bias, fp32=True)  # what the op runs, without the dispatcher's cost
    return _grouped_op(x, V, Us, bias)
