"""Triton kernels for ``y = (x @ V) @ U.T + bias`` and their launcher.

Imported lazily (it imports Triton at module level) by ``lowrank_linear_op``. Three paths:

* ``decode`` (T <= ``DECODE_MAX_TOKENS`` = 32): memory-bound on U and V. Two skinny GEMMs,
  each split so that every SM streams weights: the shrink ``z = x @ V`` over n (programs own
  row blocks of V, so each reads whole 128-byte lines of a row-major V once) and the expand
  ``z @ U.T`` over m (and over k when m alone gives too few programs). Split partials are
  fp32 and are summed by a small kernel in fixed order (deterministic, unlike atomics); ``z``
  itself is fp32, at most ``32·k·4`` bytes, and is read back from L2. Splitting k instead, so
  that z stays on chip, would read V and U in 64-byte pieces and leave SMs idle (a fused
  decode kernel ran that way: benchmarks/results/h100/v1-fused-decode/).
* ``prefill`` (T > 32, k <= 256): the fused kernel. One program per (T-tile, group of
  m-tiles) keeps its ``[BLOCK_T, k]`` fp32 intermediate on chip and reuses it for every
  m-tile of its group.
* ``shrink_expand`` (larger k): two tiled GEMMs with an fp32 ``[T, k]`` intermediate in
  global memory. At prefill sizes both GEMMs are compute-bound, so the intermediate's
  round trip (8 bytes per token and rank) mostly hides behind the math.

Numerics: fp32 accumulation everywhere. The fp32 intermediate is multiplied by U on
tensor cores as TF32 for 16-bit models (U converts exactly; z keeps fp32 range, so no fp16
overflow, and its rounding is no coarser than the output's) and in full fp32 ("ieee") for fp32
models, matching torch's default fp32 matmul.
"""

import contextlib
import functools

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from lowrank_infer.kernels.launch_config import get_config, select_path

__all__ = ["launch"]


@triton.jit
def _load_tile(ptr, rows, cols, stride_r, stride_c, n_rows, n_cols):
    """Masked 2-D load; out-of-range elements read as 0 so they add nothing to a dot."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    # int64 offsets: T * n can pass 2**31 for long prefills.
    offsets = rows[:, None].to(tl.int64) * stride_r + cols[None, :].to(tl.int64) * stride_c
    return tl.load(ptr + offsets, mask=mask, other=0.0)


@triton.jit
def _store_tile(ptr, acc, bias_ptr, rows, cols, stride_r, stride_c, n_rows, n_cols,
                HAS_BIAS: tl.constexpr):
    """Add bias (fp32), cast to the destination dtype, masked store."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offsets = rows[:, None].to(tl.int64) * stride_r + cols[None, :].to(tl.int64) * stride_c
    tl.store(ptr + offsets, acc.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_kernel(
    part_ptr, bias_ptr, out_ptr,
    S, M,
    stride_ps, stride_pt, stride_ot, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """out[t, m-tile] = sum over s, in order, of part[s, t, m-tile] (+ bias)."""
    t = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = offs_m < M
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for s in range(0, S):
        acc += tl.load(part_ptr + s * stride_ps + t * stride_pt + offs_m, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_m, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + offs_m * stride_om, acc.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _prefill_kernel(
    x_ptr, v_ptr, u_ptr, bias_ptr, out_ptr,
    T, N, M, K, cols_per_program,
    stride_xt, stride_xn, stride_vn, stride_vk, stride_um, stride_uk, stride_ot, stride_om,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """out[T-tile, m-group] = (x[T-tile] @ V) @ U[m-group].T (+ bias); BLOCK_K covers all of k."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    z = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        x = _load_tile(x_ptr, offs_t, offs_n, stride_xt, stride_xn, T, N)
        v = _load_tile(v_ptr, offs_n, offs_k, stride_vn, stride_vk, N, K)
        z = tl.dot(x, v, z, input_precision=PRECISION)
    m_start = tl.program_id(1) * cols_per_program
    m_end = tl.minimum(m_start + cols_per_program, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        u_t = _load_tile(u_ptr, offs_k, offs_m, stride_uk, stride_um, K, M)
        y = tl.dot(z, u_t.to(tl.float32), input_precision=PRECISION)
        _store_tile(out_ptr, y, bias_ptr, offs_t, offs_m, stride_ot, stride_om, T, m_end,
                    HAS_BIAS=HAS_BIAS)


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, bias_ptr, c_ptr,
    R, C, D, d_per_split,
    stride_ar, stride_ad, stride_bd, stride_bc, stride_cs, stride_cr, stride_cc,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_R: tl.constexpr,
):
    """c[s, R, C] = a[R, D-split s] @ b[D-split s, C] (+ bias[C]); b converted to a's dtype.

    ``program_id(1)`` picks the split of D (1 split: ``c`` is the result itself). Shrink
    and expand of every path.
    """
    pid = tl.program_id(0)
    # Grouped launch order: GROUP_R row-tiles sweep the columns together, so the b tiles
    # they share stay in L2.
    tiles_r = tl.cdiv(R, BLOCK_R)
    tiles_c = tl.cdiv(C, BLOCK_C)
    group = pid // (GROUP_R * tiles_c)
    first_r = group * GROUP_R
    group_rows = tl.minimum(tiles_r - first_r, GROUP_R)
    pid_r = first_r + (pid % (GROUP_R * tiles_c)) % group_rows
    pid_c = (pid % (GROUP_R * tiles_c)) // group_rows
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    d_start = tl.program_id(1) * d_per_split
    d_end = tl.minimum(d_start + d_per_split, D)
    offs_d = d_start + tl.arange(0, BLOCK_D)
    # Pointers advance by BLOCK_D per step instead of being recomputed (int64: T * n can
    # pass 2**31 for long prefills).
    a_ptrs = a_ptr + offs_r[:, None].to(tl.int64) * stride_ar + offs_d[None, :].to(tl.int64) * stride_ad
    b_ptrs = b_ptr + offs_d[:, None].to(tl.int64) * stride_bd + offs_c[None, :].to(tl.int64) * stride_bc
    mask_r = offs_r[:, None] < R
    mask_c = offs_c[None, :] < C
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for d0 in range(d_start, d_end, BLOCK_D):
        if EVEN_D:  # every D step is whole: only the R and C edges need masks
            a = tl.load(a_ptrs, mask=mask_r, other=0.0)
            b = tl.load(b_ptrs, mask=mask_c, other=0.0)
        else:
            in_d = (d0 + tl.arange(0, BLOCK_D)) < d_end
            a = tl.load(a_ptrs, mask=mask_r & in_d[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=in_d[:, None] & mask_c, other=0.0)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION)
        a_ptrs += BLOCK_D * stride_ad
        b_ptrs += BLOCK_D * stride_bd
    _store_tile(c_ptr + tl.program_id(1).to(tl.int64) * stride_cs, acc, bias_ptr, offs_r, offs_c,
                stride_cr, stride_cc, R, C, HAS_BIAS=HAS_BIAS)


# Under TRITON_INTERPRET=1, @triton.jit yields an interpreted function that runs on CPU tensors.
_INTERPRETED = not isinstance(_matmul_kernel, JITFunction)


def _cols_per_program(m, cfg):
    """Width of each of the config's M_GROUPS m-groups, in whole BLOCK_M tiles."""
    return triton.cdiv(triton.cdiv(m, cfg["BLOCK_M"]), cfg["M_GROUPS"]) * cfg["BLOCK_M"]


def _launch_prefill(x, U, V, bias, out, cfgs, precision):
    # x: [T, n], U: [m, k], V: [n, k], bias: [m] | None, out: [T, m]
    cfg = cfgs["prefill"]
    T, n = x.shape
    m, k = U.shape
    cols_per_program = _cols_per_program(m, cfg)
    grid = (triton.cdiv(T, cfg["BLOCK_T"]), triton.cdiv(m, cols_per_program))
    _prefill_kernel[grid](
        x, V, U, out if bias is None else bias, out, T, n, m, k, cols_per_program,
        x.stride(0), x.stride(1), V.stride(0), V.stride(1), U.stride(0), U.stride(1),
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, PRECISION=precision, BLOCK_T=cfg["BLOCK_T"],
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=max(16, triton.next_power_of_2(k)), BLOCK_M=cfg["BLOCK_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _launch_matmul(a, b, bias, c, cfg, precision):
    # a: [R, D], b: [D, C] (any strides), bias: [C] | None, c: [R, C]
    R, D = a.shape
    C = b.shape[1]
    block_d = cfg["BLOCK_D"]
    # Whole BLOCK_D steps per split; the split count is what remains after rounding.
    d_per_split = triton.cdiv(triton.cdiv(D, cfg["SPLIT_D"]), block_d) * block_d
    splits = triton.cdiv(D, d_per_split)
    target = c if splits == 1 else torch.empty((splits, R, C), device=c.device, dtype=torch.float32)
    grid = (triton.cdiv(R, cfg["BLOCK_R"]) * triton.cdiv(C, cfg["BLOCK_C"]), splits)
    _matmul_kernel[grid](
        a, b, target if bias is None or splits > 1 else bias, target, R, C, D, d_per_split,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        target.stride(0) if splits > 1 else 0, target.stride(-2), target.stride(-1),
        HAS_BIAS=bias is not None and splits == 1, PRECISION=precision,
        EVEN_D=D % d_per_split == 0, BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"],
        BLOCK_D=block_d, GROUP_R=cfg["GROUP_R"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if splits > 1:
        _launch_reduce(target, bias, c)


def _launch_reduce(partials, bias, out):
    # partials: [S, R, C] fp32, bias: [C] | None, out: [R, C]
    S, R, C = partials.shape
    block = min(1024, triton.next_power_of_2(C))
    _reduce_kernel[(triton.cdiv(C, block), R)](
        partials, out if bias is None else bias, out, S, C,
        partials.stride(0), partials.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, BLOCK_M=block, num_warps=4,
    )


def _two_gemms(shrink, expand):
    """Runner of a two-GEMM path whose kernels take the ``shrink``/``expand`` configs."""

    def run(x, U, V, bias, out, cfgs, precision):
        # x: [T, n], U: [m, k], V: [n, k], bias: [m] | None, out: [T, m]
        z = torch.empty((x.shape[0], U.shape[1]), device=x.device, dtype=torch.float32)
        _launch_matmul(x, V, None, z, cfgs[shrink], precision)
        _launch_matmul(z, U.T, bias, out, cfgs[expand], precision)

    return run


_PATHS = {  # path -> (launcher, kernels whose configs it takes)
    "decode": (_two_gemms("decode_shrink", "decode_expand"), ("decode_shrink", "decode_expand")),
    "prefill": (_launch_prefill, ("prefill",)),
    "shrink_expand": (_two_gemms("shrink", "expand"), ("shrink", "expand")),
}


@functools.lru_cache(maxsize=None)
def _device_info(device: torch.device) -> tuple[str, int]:
    """(name, SM count) that key the config tables; cached so repeated launches skip the query."""
    if device.type != "cuda":
        return device.type, 4
    props = torch.cuda.get_device_properties(device)
    return props.name, props.multi_processor_count


def _configs(kernels, x, U, V, overrides):
    T, n = x.shape
    m, k = U.shape
    name, sms = _device_info(x.device)
    overrides = overrides or {}
    return {kernel: overrides.get(kernel) or get_config(
        kernel, T, m, n, k, device_name=name, num_sms=sms, elem_bytes=x.element_size())
        for kernel in kernels}


def _check_out(out: torch.Tensor, x: torch.Tensor, m: int) -> None:
    want = (*x.shape[:-1], m)
    if tuple(out.shape) != want or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {want} on {x.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")


def launch(x, U, V, bias=None, *, path=None, out=None, configs=None):
    """Run the Triton op on inputs that ``check_factors`` and ``check_input`` accept.

    ``path`` forces a path (one of ``launch_config.PATHS``: tests, tuning); ``out`` (a
    contiguous ``[..., m]`` tensor) is written instead of a fresh tensor; ``configs`` maps
    kernel names (``launch_config.KERNELS``) to configs that replace the table lookup (tuning).
    """
    # x: [..., n], U: [m, k], V: [n, k], bias: [m] | None, out: [..., m] | None
    assert U.dim() == 2 and V.dim() == 2 and x.shape[-1] == V.shape[0] and U.shape[1] == V.shape[1]
    assert x.dtype == U.dtype == V.dtype and x.device == U.device == V.device
    assert bias is None or (bias.shape == U.shape[:1] and bias.dtype == x.dtype)
    if not (x.device.type == "cuda" or (x.device.type == "cpu" and _INTERPRETED)):
        raise RuntimeError(
            "triton_lowrank_linear runs on CUDA tensors, or on CPU tensors when "
            f"TRITON_INTERPRET=1 was set before triton was imported; got {x.device} tensors")
    if _INTERPRETED and x.dtype == torch.bfloat16:
        # The interpreter's bf16 tl.dot returns garbage (values off by 1e10), not an error.
        raise TypeError("Triton's CPU interpreter computes bfloat16 dots wrongly; use float16 or float32 "
                        "with TRITON_INTERPRET=1 (bfloat16 runs on CUDA)")
    m, k = U.shape
    x2d = x.reshape(-1, x.shape[-1])
    if out is None:
        out = torch.empty((*x.shape[:-1], m), device=x.device, dtype=x.dtype)
    else:
        _check_out(out, x, m)
    if x2d.shape[0] == 0:
        return out
    runner, kernels = _PATHS[path or select_path(x2d.shape[0], k)]
    cfgs = _configs(kernels, x2d, U, V, configs)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    bias = None if bias is None else bias.contiguous()
    guard = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        runner(x2d, U, V, bias, out.view(-1, m), cfgs, precision)
    return out
