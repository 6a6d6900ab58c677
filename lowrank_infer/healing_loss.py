"""The healing loss: KL divergence from the dense model's next-token distributions, each coarsened
to its ``top_k`` tokens plus one bucket for the rest of the vocabulary (see :mod:`lowrank_infer.healing`).

Per position, with ``p`` the dense top-k probabilities, ``s`` the compressed model's log-probabilities
of the same tokens and ``r`` the mass outside them, the loss is
``Σ p·(log p − s) + r_dense·(log r_dense − log r_compressed)``.

The vocabulary-wide part is the expensive one on a small model: SmolLM2's 49,152-token head turns a
512-token window into 25 M float32 logits that autograd keeps, and its backward pass walks them three
more times. Where the logits are simply the output layer applied to the last hidden states (checked
on the model itself), :func:`coarsened_kl` therefore computes them a chunk of positions at a time and
forms the gradient with respect to the hidden states in the same pass, from its closed form: for a
logit ``z_j`` with student probability ``q_j``,

    ∂loss/∂z_j = q_j − p_j                      for the teacher's top tokens,
    ∂loss/∂z_j = q_j · (1 − r_dense/r_compressed)  for every other token,

so no logits outlive their chunk (the idea of fused linear cross-entropy, applied to this loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["coarsened_kl", "frozen_copy", "fusable_head"]

# Logits computed at once by the fused loss (32 MiB of float32): a chunk of positions at a time.
CHUNK_LOGITS = 1 << 23
_TINY = 1e-12  # a student that puts (numerically) all its mass on the top tokens pays -log of this


def fusable_head(model: nn.Module, ids: torch.Tensor) -> nn.Linear | None:
    """``model``'s frozen output layer when its logits on ``ids`` are that layer applied to its base
    model's last hidden states (no soft-capping, scaling or bias trick in between), else ``None``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    if not isinstance(head, nn.Linear) or head.weight.requires_grad or base is None or base is model:
        return None
    device = head.weight.device
    with torch.no_grad():
        try:
            hidden = base(ids.to(device), use_cache=False).last_hidden_state
        except (TypeError, AttributeError):
            return None
        logits = model(ids.to(device), use_cache=False).logits
        return head if torch.allclose(head(hidden), logits, rtol=1e-4, atol=1e-4) else None


def frozen_copy(head: nn.Linear, compute_dtype: str) -> nn.Linear:
    """``head`` with its weight and bias cast once to ``compute_dtype`` (itself for ``"float32"``):
    SmolLM2's output layer shares its weight with the embedding table, which must stay float32
    (:func:`~lowrank_infer.precision.frozen_weights_cast`), and autocast would cast it again at every step."""
    dtype = getattr(torch, compute_dtype)
    if head.weight.dtype == dtype or compute_dtype == "float32":
        return head
    copy = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
    copy.weight = nn.Parameter(head.weight.detach().to(dtype), requires_grad=False)
    if head.bias is not None:
        copy.bias = nn.Parameter(head.bias.detach().to(dtype), requires_grad=False)
    return copy


def coarsened_kl(model: nn.Module, ids: torch.Tensor, logp: torch.Tensor, index: torch.Tensor,
                 head: nn.Linear | None = None) -> torch.Tensor:
    """Mean over positions of the coarsened KL divergence of ``model`` on ``ids`` from the dense
    ``logp``/``index`` (``[windows, seq_len, top_k]``), all on the model's device. With ``head``
    (:func:`fusable_head`), the fused chunked computation; otherwise through ``model(ids).logits``."""
    if head is None:
        logits = _wide(model(ids, use_cache=False).logits)
        student = logits.gather(-1, index.long()) - logits.logsumexp(-1, keepdim=True)
        return _kl_rows(logp, student, logits.shape[-1]).mean()
    hidden = model.base_model(ids, use_cache=False).last_hidden_state
    flat = hidden.reshape(-1, hidden.shape[-1])
    need_grad = torch.is_grad_enabled() and flat.requires_grad
    return _FusedHeadKL.apply(flat, head.weight, head.bias, index.reshape(-1, index.shape[-1]).long(),
                              logp.reshape(-1, logp.shape[-1]), need_grad)


def _kl_rows(teacher: torch.Tensor, student: torch.Tensor, vocab: int) -> torch.Tensor:
    """Per-position loss from the teacher's and student's log-probabilities of the top tokens."""
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    if teacher.shape[-1] < vocab:  # else there is no rest
        rest_t, rest_s = _rest(teacher), _rest(student)
        kl = kl + torch.xlogy(rest_t, rest_t) - rest_t * rest_s.clamp_min(_TINY).log()
    return kl


def _in_compute_dtype(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` cast once to autocast's dtype where autocast is on: it would otherwise cast the
    frozen head again for every chunk and for every gradient product (it caches only trained tensors)."""
    device = weight.device.type
    if torch.is_autocast_enabled(device) and weight.is_floating_point():
        return weight.to(torch.get_autocast_dtype(device))
    return weight


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits in float32 at least (softmax sums over the whole vocabulary)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _rest(logp: torch.Tensor) -> torch.Tensor:
    """The probability mass outside the top tokens, ``1 − Σ exp(logp)``, at least 0."""
    return (-torch.expm1(logp.logsumexp(-1))).clamp_min(0)


class _FusedHeadKL(torch.autograd.Function):
    """``Σ_rows loss / rows`` of the logits ``hidden @ weightᵀ + bias``, the gradient with respect to
    ``hidden`` formed in the forward pass (the weight is frozen: no gradient for it)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, index, teacher, need_grad: bool):
        rows = hidden.shape[0]
        step = max(1, CHUNK_LOGITS // weight.shape[0])
        sums, grad = [], torch.empty_like(hidden) if need_grad else None
        weight = _in_compute_dtype(weight)
        for start in range(0, rows, step):
            part = slice(start, start + step)
            kl, grad_part = _chunk(hidden[part], weight, bias, index[part], teacher[part], need_grad)
            sums.append(kl.sum())
            if need_grad:
                grad[part] = grad_part / rows
        if need_grad:
            ctx.save_for_backward(grad)
        return torch.stack(sums).sum() / rows

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None


def _chunk(hidden, weight, bias, index, teacher, need_grad: bool):
    """Loss of each row of one chunk and, if asked, its gradient with respect to ``hidden`` (see the
    module docstring); the chunk's logits are overwritten in place by their gradient."""
    z = _wide(F.linear(hidden, weight, bias))
    lse = z.logsumexp(-1, keepdim=True)
    student = z.gather(-1, index) - lse
    kl = _kl_rows(teacher, student, z.shape[-1])
    if not need_grad:
        return kl, None
    p, q_top = teacher.exp(), student.exp()
    if teacher.shape[-1] < z.shape[-1]:
        rest_s = -torch.expm1(student.logsumexp(-1))
        # The loss's rest term is constant where the student's rest mass was clamped.
        ratio = torch.where(rest_s > _TINY, _rest(teacher) / rest_s.clamp_min(_TINY), 0.0)
    else:
        ratio = torch.zeros_like(lse.squeeze(-1))
    # Written for every token, then corrected on the top ones: q·(P − ratio·Q) − p + ratio·q, where
    # P, Q are the two models' top masses; with ratio = r_dense/r_compressed this is the closed form.
    grad_z = z.sub_(lse).exp_().mul_((p.sum(-1) - ratio * q_top.sum(-1)).unsqueeze(-1))
    grad_z.scatter_add_(-1, index, ratio.unsqueeze(-1) * q_top - p)
    return kl, grad_z.to(weight.dtype) @ weight  # under autocast, in its dtype
