"""Pack a compressed model for inference: rank-major right factors, and one shrink for the
low-rank linears of a decoder block that read the same input.

The kernels read ``Vᵀ`` row by row, so every low-rank ``V`` becomes the transposed view of a
contiguous ``Vᵀ``. Layers that read the same input are *stacked*: their ``Vᵀ`` (and biases) are
row blocks of one contiguous tensor, and each layer's parameter is a view of its block, so the
weights exist once and ``state_dict``, optimizers and in-place loads still see every parameter.

* A gated MLP (``down(act(gate(x)) * up(x))``; Phi-3's fused ``gate_up_proj`` too) is replaced by
  a module with the same children that runs :func:`~lowrank_infer.kernels.lowrank_gated_linear`.
* Attention's q/k/v keep their modules and the attention's own forward: hooks on the attention
  module hand its ``hidden_states`` to the stack; the first projection called with that very
  tensor computes the whole group by :func:`~lowrank_infer.kernels.lowrank_grouped_linear`, the
  others take their slice, and the output is dropped when the attention returns. Any other
  call (another input, a projection called on its own) runs the layer alone.

Packed layers run alone whenever the stack cannot be used: while gradients are recorded (the
grouped kernels have no backward; the layers' own op has), and when the members no longer
share storage. Whatever separates them is repaired: ``.to()``/``.half()``/``.cuda()`` and
parameter assignment (``load_state_dict(assign=True)``) re-stack the members at once, and every
eager call checks the sharing first (``copy.deepcopy``, ``param.data = ...``). Compiled code
cannot run that check: after a deep copy it runs the copied layers alone, and after writing
``param.data`` it would read the old values; call :func:`pack_model` again after either.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from lowrank_infer.kernels import ACTIVATIONS, lowrank_gated_linear, lowrank_grouped_linear
from lowrank_infer.module import LowRankLinear
from lowrank_infer.structure import decoder_blocks, replace_module

__all__ = ["PackReport", "pack_model", "unshared_state_dict"]

QKV = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class PackReport:
    """What a model holds after :func:`pack_model` (a second call returns the same report).

    Attributes:
        rank_major: low-rank layers whose ``V`` is rank-major.
        gated_mlps: MLPs whose gate and up projections run as one ``lowrank_gated_linear``.
        qkv_groups: attention modules whose low-rank q/k/v projections share one shrink.
    """

    rank_major: int
    gated_mlps: int
    qkv_groups: int


def _needs_grad(modules) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for m in modules for p in m.parameters())


def _stack_into(params: list[nn.Parameter], transposed: bool) -> tuple[torch.Tensor, list[int]]:
    """One contiguous tensor whose row blocks are ``params`` (``p.T`` when ``transposed``); each
    parameter becomes a view of its block. Returns the tensor and each block's byte offset."""
    whole = torch.cat([p.T if transposed else p for p in params])
    offsets, start = [], 0
    for p in params:
        rows = p.shape[1] if transposed else p.shape[0]
        block = whole[start:start + rows]
        p.data = block.T if transposed else block
        offsets.append(block.data_ptr() - whole.data_ptr())
        start += rows
    return whole, offsets


class _Stack:
    """Low-rank linears whose ``Vᵀ`` (and biases) are row blocks of ``Vt`` (and ``bias``)."""

    def __init__(self, members: list[LowRankLinear]) -> None:
        self.members = members
        self.Vt = self.bias = None
        # q/k/v: (the attention's input, the group's output for it or None). One tuple, replaced
        # whole, so that a caller never takes the output computed for another caller's input.
        self.shared = None
        start = 0
        for member in members:
            member.__class__ = _PackedLinear
            member._stack = self
            member._columns = (start, start + member.out_features)
            start += member.out_features
        self.restack()

    def __deepcopy__(self, memo) -> "_Stack":
        # Parameter.__deepcopy__ clones each member's V on its own: the copy re-stacks on its first
        # eager call (and runs unstacked until then), instead of holding a second, stale Vᵀ.
        new = copy.copy(self)
        memo[id(self)] = new
        new.members = copy.deepcopy(self.members, memo)
        new.Vt = new.bias = new.shared = None
        return new

    def intact(self) -> bool:
        """Whether every member's ``V`` (and bias) is still the view of its block."""
        if self.Vt is None:
            return False
        return all(
            m.V.data_ptr() == self.Vt.data_ptr() + v_off
            and (m.bias is None or m.bias.data_ptr() == self.bias.data_ptr() + b_off)
            for m, v_off, b_off in zip(self.members, self._v_offsets, self._bias_offsets)
        )

    def restack(self) -> None:
        """Make the members views of one ``Vt`` again, copying them once; when they are on different
        devices or dtypes (halfway through ``.to()``) drop ``Vt``, and they run alone."""
        if self.intact():
            return
        params = [p for m in self.members for p in m.parameters()]
        if len({(p.device, p.dtype) for p in params}) > 1 or params[0].is_meta:
            self.Vt = self.bias = None
            return
        with torch.no_grad():
            self.Vt, self._v_offsets = _stack_into([m.V for m in self.members], transposed=True)
            if self.members[0].bias is None:
                self.bias, self._bias_offsets = None, [0] * len(self.members)
            else:
                self.bias, self._bias_offsets = _stack_into([m.bias for m in self.members], transposed=False)

    def usable(self) -> bool:
        """Whether a call may run the stack (eager calls re-stack first, see the module docstring)."""
        if not torch.compiler.is_compiling():
            self.restack()
        return self.Vt is not None and not _needs_grad(self.members)

    def share(self, x: torch.Tensor | None) -> None:
        """Let the members called with ``x`` (and only those) share one grouped call; None stops it."""
        self.shared = (x, None) if x is not None and self.usable() else None

    def member_output(self, member: "_PackedLinear", x: torch.Tensor) -> torch.Tensor:
        shared = self.shared
        if shared is None or x is not shared[0]:
            return LowRankLinear.forward(member, x)
        y = shared[1]
        if y is None:
            y = lowrank_grouped_linear(x, self.Vt.T, [m.U for m in self.members], self.bias)
            self.shared = (x, y)
        start, stop = member._columns
        return y[..., start:stop]


class _PackedLinear(LowRankLinear):
    """A ``LowRankLinear`` in a ``_Stack`` (set by changing the class: parameters, hooks and
    ``state_dict`` keys stay as they are)."""

    _stack: _Stack
    _columns: tuple[int, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._stack.member_output(self, x)

    def _apply(self, fn, recurse=True):
        # .to() & co. give each parameter its own new storage; once the last member has moved,
        # the stack is rebuilt there (only this group's V is ever held twice).
        super()._apply(fn, recurse)
        self._stack.restack()
        return self

    def register_parameter(self, name, param):
        # load_state_dict(assign=True) and `layer.V = ...` land here: re-stacked at once, compiled
        # code (which cannot check) never reads a replaced parameter's old value.
        super().register_parameter(name, param)
        self._stack.restack()


def _qkv_stack(attention: nn.Module) -> _Stack | None:
    for name in QKV:
        child = getattr(attention, name, None)
        if isinstance(child, _PackedLinear):
            return child._stack
    return None


def _share_input(attention, args, kwargs) -> None:
    # Looked up on each call, not captured: a projection swapped out later (dequantize) ends the
    # sharing instead of leaving a stale stack behind.
    stack = _qkv_stack(attention)
    if stack is not None:
        stack.share(kwargs.get("hidden_states", args[0] if args else None))


def _end_sharing(attention, args, kwargs, output) -> None:
    stack = _qkv_stack(attention)
    if stack is not None:
        stack.share(None)


class _GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` whose low-rank gate and up share one ``lowrank_gated_linear``.

    Holds the original MLP's children under their names, so ``state_dict`` keys do not change.
    """

    def __init__(self, mlp: nn.Module, activation: str) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        self.activation = activation
        _Stack([self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj, self.up_proj
        stack = gate._stack if isinstance(gate, _PackedLinear) else None
        if stack is None or stack.members != [gate, up] or not stack.usable():
            return self.down_proj(self.act_fn(gate(x)) * up(x))
        return self.down_proj(lowrank_gated_linear(x, stack.Vt.T, gate.U, up.U, activation=self.activation))


class _FusedGatedMLP(nn.Module):
    """Phi-3's MLP: ``gate_up_proj`` computes ``[gate | up]``; its one ``V`` serves both halves."""

    def __init__(self, mlp: nn.Module, activation: str) -> None:
        super().__init__()
        self.gate_up_proj, self.down_proj, self.activation_fn = mlp.gate_up_proj, mlp.down_proj, mlp.activation_fn
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.gate_up_proj
        if not _lowrank(proj) or _needs_grad([proj]):
            gate, up = proj(x).chunk(2, dim=-1)
            return self.down_proj(up * self.activation_fn(gate))
        half = proj.out_features // 2
        return self.down_proj(lowrank_gated_linear(
            x, proj.V, proj.U[:half], proj.U[half:], up_start=0, activation=self.activation))


def _lowrank(module) -> bool:
    return isinstance(module, LowRankLinear) and not module.is_dense


def _packable(module) -> bool:
    """A low-rank layer not yet stacked whose weights are here (not offloaded) and whose forward is
    its own (accelerate's hooks replace it)."""
    return (_lowrank(module) and not isinstance(module, _PackedLinear) and "forward" not in vars(module)
            and not any(p.is_meta for p in module.parameters()))


def _activation(act, device: torch.device) -> str | None:
    """The name in ``ACTIVATIONS`` of what ``act`` computes, checked on sample values on ``device``
    (classes vary: ``nn.SiLU``, ``SiLUActivation``, ``GELUTanh``; a hub kernel may run on the GPU
    only); None for anything else, e.g. exact GELU."""
    if not callable(act) or (isinstance(act, nn.Module) and any(True for _ in act.parameters())):
        return None
    probe = torch.linspace(-8.0, 8.0, 161, device=device)
    with torch.no_grad():
        got = act(probe.clone())
    return next((name for name, fn in ACTIVATIONS.items() if torch.equal(got, fn(probe))), None)


def _same_forward(module: nn.Module, reference) -> bool:
    # An MLP qualifies by what its forward does, not by its children's names alone: variants with
    # the same children but other math (Gemma-3n's activation sparsity) must stay as they are.
    mine = getattr(type(module).forward, "__code__", None)
    return mine is not None and (mine.co_code, mine.co_names) == (reference.__code__.co_code, reference.__code__.co_names)


def _packed_mlp(module: nn.Module) -> nn.Module | None:
    """The packed replacement of ``module`` when it is a gated MLP that qualifies, else None."""
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    if module._forward_hooks or module._forward_pre_hooks or "forward" in vars(module):
        return None
    if _same_forward(module, LlamaMLP.forward):
        gate, up = module.gate_proj, module.up_proj
        if (_packable(gate) and _packable(up) and gate.bias is None and up.bias is None
                and gate.in_features == up.in_features and gate.U.dtype == up.U.dtype and gate.U.device == up.U.device):
            activation = _activation(module.act_fn, gate.U.device)
            return None if activation is None else _GatedMLP(module, activation)
    if _same_forward(module, Phi3MLP.forward):
        proj = module.gate_up_proj
        if _packable(proj) and proj.bias is None and proj.out_features % 2 == 0:
            activation = _activation(module.activation_fn, proj.U.device)
            return None if activation is None else _FusedGatedMLP(module, activation)
    return None


def _group_qkv(attention: nn.Module) -> None:
    """Stack the low-rank q/k/v of ``attention`` when at least two of them fit together."""
    members = [getattr(attention, name) for name in QKV if _packable(getattr(attention, name))]
    if len(members) < 2:
        return
    first = members[0]
    if any(m.in_features != first.in_features or m.U.dtype != first.U.dtype or m.U.device != first.U.device
           or (m.bias is None) != (first.bias is None) for m in members):
        return
    _Stack(members)
    if _share_input not in attention._forward_pre_hooks.values():
        attention.register_forward_pre_hook(_share_input, with_kwargs=True)
        attention.register_forward_hook(_end_sharing, with_kwargs=True)


def _make_rank_major(layer: LowRankLinear) -> None:
    if not layer.V.T.is_contiguous():
        with torch.no_grad():
            layer.V.data = layer.V.T.contiguous().T


def pack_model(model: nn.Module) -> PackReport:
    """Pack ``model``'s low-rank layers for inference, in place (see the module docstring).

    Each decoder block's gated MLP runs ``lowrank_gated_linear`` when its gate and up projections
    are low-rank, bias-free and its activation is SiLU or tanh-GELU; its low-rank q/k/v projections
    (two or more, with one input size) share one ``lowrank_grouped_linear`` shrink. Then every
    low-rank ``V`` is made rank-major. One layer is converted at a time: the extra memory is at
    most one group's ``V``. ``state_dict`` keys and values are unchanged, and a second call
    changes nothing (it only re-stacks groups whose parameters were replaced since). Layers whose
    weights are offloaded (on the meta device) are left as they are.

    ``model.to(...)`` (and ``.half()``, ``.cuda()``…) keeps a packed model packed: each group is
    re-stacked on arrival, so no layer ever computes with the weights it had before the move.

    Packing is for inference: while gradients are recorded, every layer runs on its own, so
    training a packed model still updates (and reads) its real parameters.

    Args:
        model: a model holding ``LowRankLinear`` layers (e.g. from :func:`lowrank_infer.compress`).

    Returns:
        What the model holds afterwards.

    Raises:
        ValueError: the model has no list of decoder blocks.
    """
    _, blocks = decoder_blocks(model)
    for block in blocks:
        for name, module in list(block.named_modules()):
            packed = _packed_mlp(module) if name else None
            if packed is not None:
                replace_module(block, name, packed)
            elif all(hasattr(module, n) for n in QKV):
                _group_qkv(module)
    lowrank = [m for m in model.modules() if _lowrank(m)]
    for layer in lowrank:
        if isinstance(layer, _PackedLinear):
            layer._stack.restack()  # packed before: a no-op unless its parameters were replaced
        elif not layer.V.is_meta:
            _make_rank_major(layer)
    return PackReport(
        rank_major=sum(layer.V.T.is_contiguous() for layer in lowrank),
        gated_mlps=sum(isinstance(m, (_GatedMLP, _FusedGatedMLP)) for m in model.modules()),
        qkv_groups=sum(_qkv_stack(m) is not None for m in model.modules()),
    )


def _storage(tensor: torch.Tensor) -> tuple[torch.device, int]:
    return tensor.device, tensor.untyped_storage().data_ptr()


def unshared_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with a copy of every tensor that is one of several different views
    of one storage (the factors of a packed group), for saving.

    safetensors refuses tensors that share storage, and transformers' save, which removes tied
    weights (one tensor under two names) before writing, fails on such views; tied weights are
    left to it. The copies cost one extra copy of the packed factors while saving.
    """
    state_dict = model.state_dict()
    real = {name: t for name, t in state_dict.items() if isinstance(t, torch.Tensor) and not t.is_meta}
    views = defaultdict(set)
    for tensor in real.values():
        views[_storage(tensor)].add((tensor.data_ptr(), tensor.shape, tensor.stride()))
    for name, tensor in real.items():
        if len(views[_storage(tensor)]) > 1:
            state_dict[name] = tensor.clone(memory_format=torch.contiguous_format)
    return state_dict
