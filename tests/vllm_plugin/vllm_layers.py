"""Layer-level check of the vLLM plugin, run in processes of their own (tensor parallel over gloo).

Each case builds a vLLM linear layer twice: with the plugin, from a checkpoint's factors, and
without quantization, from the dense weights ``U @ V.T`` those factors stand for. Both load
through vLLM's own ``AutoWeightsLoader`` with the model's stacked-name mapping, so vLLM's
dense sharding is the reference for ours: every rank's output must agree, in either
tensor-parallel layout (``tp_sharding`` "half" or "full"), whose per-rank factor memory is
checked against the README's formulas. Row-parallel outputs, complete on every rank once
all-reduced, are also held to ``U (Vᵀ x) + b`` computed in one process, without vLLM.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from lowrank_infer.allocation import LayerRank, RankPlan

HIDDEN, INTERMEDIATE, HEAD, HEADS, KV_HEADS = 64, 96, 16, 4, 1  # at TP 2 each k/v head is on both ranks

# name → (out_features, in_features, rank or None, bias)
LINEARS = {
    "split.q_proj": (HEADS * HEAD, HIDDEN, 6, True),
    "split.k_proj": (KV_HEADS * HEAD, HIDDEN, None, True),
    "split.v_proj": (KV_HEADS * HEAD, HIDDEN, 5, True),
    "split.o_proj": (HIDDEN, HEADS * HEAD, 8, False),
    "split.gate_proj": (INTERMEDIATE, HIDDEN, None, False),
    "split.up_proj": (INTERMEDIATE, HIDDEN, 7, False),
    "split.down_proj": (HIDDEN, INTERMEDIATE, 9, True),  # row-parallel bias: added once, not per rank
    "fused.qkv_proj": ((HEADS + 2 * KV_HEADS) * HEAD, HIDDEN, 10, False),  # Phi-3: one rank for q, k and v
    "fused.gate_up_proj": (2 * INTERMEDIATE, HIDDEN, 12, False),
}
# vLLM layers whose factor memory is checked → (their one low-rank checkpoint linear, column-parallel?).
# Their rows split evenly at TP 2 (no replicated k/v heads); up_proj's rank 7 is padded to 8 when
# fully sharded at TP 2, down_proj's rank 9 is not (a row-parallel layer does not split k).
MEMORY_LAYERS = {"fused.gate_up_proj": ("fused.gate_up_proj", True), "split.gate_up_proj": ("split.up_proj", True),
                 "split.o_proj": ("split.o_proj", False), "split.down_proj": ("split.down_proj", False)}
SHARDINGS = ("half", "full")  # tensor-parallel layouts (lowrank_infer.vllm_plugin.sharding)
ROW_PARALLEL = ("split.o_proj", "split.down_proj")
SPLIT_MAPPING = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
FUSED_MAPPING = {"qkv_proj": ["qkv_proj"], "gate_up_proj": ["gate_up_proj"]}
STACKED = {".q_proj": (".qkv_proj", "q"), ".k_proj": (".qkv_proj", "k"), ".v_proj": (".qkv_proj", "v"),
           ".gate_proj": (".gate_up_proj", 0), ".up_proj": (".gate_up_proj", 1)}


def plan() -> RankPlan:
    layers = [LayerRank(name, out_f, in_f, rank) for name, (out_f, in_f, rank, _) in LINEARS.items()]
    return RankPlan(layers, keep_target=0.5, method="ara", model="layer-test")


def checkpoint(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(factored, dense)`` checkpoint tensors: the same linears as U/V (or weight) and as weight."""
    gen = torch.Generator().manual_seed(seed)
    factored, dense = {}, {}
    for name, (out_f, in_f, rank, bias) in LINEARS.items():
        if rank is None:
            factored[f"{name}.weight"] = dense[f"{name}.weight"] = torch.randn(out_f, in_f, generator=gen)
        else:
            U, V = torch.randn(out_f, rank, generator=gen), torch.randn(in_f, rank, generator=gen)
            factored[f"{name}.U"], factored[f"{name}.V"], dense[f"{name}.weight"] = U, V, U @ V.T
        if bias:
            factored[f"{name}.bias"] = dense[f"{name}.bias"] = torch.randn(out_f, generator=gen)
    return factored, dense


def _block(prefix: str, quant_config) -> nn.Module:
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear

    block = nn.Module()
    block.qkv_proj = QKVParallelLinear(HIDDEN, HEAD, HEADS, KV_HEADS, bias=prefix == "split",
                                       quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
    block.gate_up_proj = MergedColumnParallelLinear(HIDDEN, [INTERMEDIATE] * 2, bias=False,
                                                    quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
    if prefix == "split":
        block.o_proj = RowParallelLinear(HEADS * HEAD, HIDDEN, bias=False, quant_config=quant_config,
                                         prefix=f"{prefix}.o_proj")
        block.down_proj = RowParallelLinear(INTERMEDIATE, HIDDEN, bias=True, quant_config=quant_config,
                                            prefix=f"{prefix}.down_proj")
    return block


def build(quant_config) -> nn.Module:
    """Both blocks, the split one (Llama's names) and the fused one (Phi-3's)."""
    model = nn.Module()
    if quant_config is not None:
        quant_config.packed_modules_mapping.update(SPLIT_MAPPING)
    model.split = _block("split", quant_config)
    if quant_config is not None:
        quant_config.packed_modules_mapping.update(FUSED_MAPPING)
    model.fused = _block("fused", quant_config)
    return model


def load(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper

    loaded = AutoWeightsLoader(model).load_weights(tensors.items(), mapper=WeightsMapper(orig_to_new_stacked=STACKED))
    assert loaded == {name for name, _ in model.named_parameters()}, "some parameter was not loaded"
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)


def outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each layer's output on this rank; row-parallel layers take this rank's part of ``x``."""
    from vllm.model_executor.layers.linear import RowParallelLinear

    results = {}
    for name, layer in model.named_modules():
        if hasattr(layer, "quant_method"):
            inputs = x[..., :layer.input_size]  # o_proj reads HEADS*HEAD, down_proj INTERMEDIATE features
            if isinstance(layer, RowParallelLinear):
                inputs = inputs.chunk(layer.tp_size, dim=-1)[layer.tp_rank].contiguous()
            results[name] = layer(inputs)[0]
    return results


def factor_numbers(m: int, n: int, k: int, tp: int, sharding: str, column: bool) -> int:
    """U and V numbers per rank (README): half shards what vLLM shards, full (m + n)·k/tp.

    A fully sharded column-parallel layer pads k up to a multiple of the TP size.
    """
    if sharding == "full" and tp > 1:
        padded = -(-k // tp) * tp if column else k
        return (m + n) * padded // tp
    return m * k // tp + n * k if column else m * k + n * k // tp


def check_memory(model: nn.Module, tp: int, sharding: str) -> None:
    for name, (linear, column) in MEMORY_LAYERS.items():
        layer = model.get_submodule(name)
        m, n, k, _ = LINEARS[linear]
        held = layer.U.numel() + layer.V.numel()
        expected = factor_numbers(m, n, k, tp, sharding, column)
        assert held == expected, f"{name} ({sharding}, TP {tp}) holds {held} factor numbers, expected {expected}"


def single_process(factored: dict[str, torch.Tensor], x: torch.Tensor, name: str) -> torch.Tensor:
    """``U (Vᵀ x) + b`` of checkpoint linear ``name`` in float64, in this process: no vLLM, no sharding."""
    U, V = factored[f"{name}.U"].double(), factored[f"{name}.V"].double()
    y = (x[..., :V.shape[0]].double() @ V) @ U.T
    bias = factored.get(f"{name}.bias")
    return y if bias is None else y + bias.double()


def check_plan_mismatch() -> None:
    """A plan whose k_proj is not the model's shape is refused when the layer is built, by name."""
    import pytest

    from lowrank_infer.vllm_plugin import LowRankVllmConfig

    wrong = plan()
    wrong["split.k_proj"].out_features *= 2
    config = LowRankVllmConfig(wrong)
    config.packed_modules_mapping.update(SPLIT_MAPPING)
    with pytest.raises(ValueError, match=r"'split\.k_proj' is 32x64 but the model served by vLLM has 16x64"):
        _block("split", config)


def check_missing_factor(factored: dict[str, torch.Tensor]) -> None:
    """A checkpoint without v_proj.V is refused by name, though vLLM saw V loaded (for q_proj)."""
    import pytest

    from lowrank_infer.vllm_plugin import LowRankVllmConfig

    partial = {name: tensor for name, tensor in factored.items() if name != "split.v_proj.V"}
    with pytest.raises(ValueError, match=r"checkpoint has no tensor split\.v_proj\.V"):
        load(build(LowRankVllmConfig(plan())), partial)


def check_uneven_rows_refused() -> None:
    """Fully sharded, a row-parallel layer whose output rows the TP size does not divide is refused by name."""
    import pytest
    from vllm.model_executor.layers.linear import RowParallelLinear

    from lowrank_infer.vllm_plugin import LowRankVllmConfig

    odd = RankPlan([LayerRank("odd.o_proj", HIDDEN - 1, HEADS * HEAD, 4)], keep_target=0.5, method="uniform",
                   model="layer-test")
    with pytest.raises(ValueError, match=r"odd\.o_proj: fully sharded .* its 63 output rows over 2 ranks"):
        RowParallelLinear(HEADS * HEAD, HIDDEN - 1, bias=False, quant_config=LowRankVllmConfig(odd, "full"),
                          prefix="odd.o_proj")


def run_rank(rank: int, world_size: int, port: int, dtype_name: str = "float32") -> None:
    """One tensor-parallel rank: compare the plugin's layers, in both layouts, with vLLM's dense ones.

    In bfloat16 the two round differently (the half layout keeps the intermediate ``x V`` in
    float32 on the CPU, the full one sends it in bfloat16; the dense reference rounds ``U Vᵀ``
    to bfloat16), so each output is held to a relative Frobenius error of 2e-2 instead of
    float32's element-wise 1e-4.
    """
    dtype = getattr(torch, dtype_name)
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    from lowrank_infer.vllm_plugin import LowRankVllmConfig

    torch.set_num_threads(1)
    # vLLM's CPU worker names the shared-memory group its ranks all-reduce through; so do we.
    os.environ["VLLM_DIST_IDENT"] = f"lowrank-layer-test-{port}"
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=world_size, rank=rank, local_rank=rank, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel(tensor_model_parallel_size=world_size)
        torch.set_default_dtype(dtype)  # vLLM's layers take their parameter dtype from it
        factored, dense = (
            {name: tensor.to(dtype) for name, tensor in tensors.items()} for tensors in checkpoint())
        x = torch.randn(5, max(HIDDEN, INTERMEDIATE), generator=torch.Generator().manual_seed(1)).to(dtype)
        dense_model = build(None)
        load(dense_model, dense)
        expected, got = outputs(dense_model, x), {}
        for sharding in SHARDINGS:
            lowrank_model = build(LowRankVllmConfig(plan(), sharding))
            load(lowrank_model, factored)
            got[sharding] = outputs(lowrank_model, x)
            check_memory(lowrank_model, world_size, sharding)
        if dtype == torch.float32:
            check_plan_mismatch()
            check_missing_factor(factored)
            if world_size == 2:
                check_uneven_rows_refused()
    for sharding, results in got.items():
        for name in expected:
            where = f"{name} ({sharding} sharding) on rank {rank}"
            assert results[name].dtype == dtype, f"{where}: {results[name].dtype}"
            _check_close(results[name], expected[name], where)
            if name in ROW_PARALLEL:
                _check_close(results[name], single_process(factored, x, name), f"{where}, against U(Vᵀx)")


def _check_close(got: torch.Tensor, want: torch.Tensor, where: str) -> None:
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-4, atol=1e-4, msg=lambda m: f"{where}: {m}")
    else:
        error = ((got.double() - want.double()).norm() / want.double().norm()).item()
        assert error < 2e-2, f"{where}: relative error {error:.3g} in {got.dtype}"
