"""Triton kernels for ``y = (x @ V) @ U.T + bias`` and their launcher.

Imported lazily (it imports Triton at module level) by ``lowrank_linear_op``. Three paths:

* ``decode`` (T <= ``DECODE_MAX_TOKENS`` = 32): memory-bound on U and V, so two launches,
  each streaming its weights in long contiguous runs. The shrink is swap-AB: ``zᵀ = Vᵀ xᵀ``
  puts 64 rank rows of ``Vᵀ [k, n]`` (rank-major, as ``LowRankLinear`` stores V) on the MMA's
  wide side (``wgmma`` on Hopper) and the tokens on its narrow side; n is split so every SM
  streams an equal share, and the last program of each row tile to arrive adds the fp32
  partials in split order and resets its counter (deterministic, graph-safe, no reduction
  launch). The expand gives each program whole rows of U, so it needs no split at all; for a
  gated MLP it reads the gate's and the up projection's rows and writes only ``act(g) * u``.
  ``z`` (fp32, ``T·k·4`` bytes), the partials and the counters live in a preallocated
  workspace. With PDL (:func:`~lowrank_infer.kernels.set_pdl`) each kernel prefetches its
  weights into L2 before waiting for the previous kernel.
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

from lowrank_infer.kernels.gated_op import ACTIVATIONS as _ACTIVATIONS
from lowrank_infer.kernels.launch_config import DECODE_MAX_TOKENS, get_config, select_path

__all__ = ["launch", "launch_gated", "launch_grouped"]


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
def _prefetch_rows_l2(ptr, rows, n_rows, col_start, col_end, stride_r, LINE: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """Ask L2 for the 128-byte lines of ``ptr[rows, col_start:col_end]`` (PDL: weights do not
    depend on the previous kernel, so they are fetched before ``gdc_wait``)."""
    for c0 in range(col_start, col_end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C // LINE) * LINE
        ok = (rows[:, None] < n_rows) & (cols[None, :] < col_end)
        # An out-of-range line is replaced by the first one, which is valid and cheap to refetch.
        offsets = tl.where(ok, rows[:, None].to(tl.int64) * stride_r + cols[None, :], 0)
        tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];", "=r,l", [ptr + offsets],
                                  dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _decode_shrink_kernel(
    x_ptr, vt_ptr, z_ptr, part_ptr, count_ptr,
    T, N, K, n_per_split, splits,
    stride_xt, stride_xn, stride_vk, stride_vn, stride_zt, stride_zk,
    PRECISION: tl.constexpr, USE_PDL: tl.constexpr, LINE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """zᵀ[k-tile, :T] = Vᵀ[k-tile, n-split] @ xᵀ[n-split, :T], swap-AB: the weights are the MMA's
    wide side (BLOCK_K rows of Vᵀ, read whole), the few tokens its narrow side.

    Program (i, s) covers rank rows tile i over split s of n. With one split it writes z; with
    several, each writes its fp32 partial, and the last of a tile's programs to arrive (an atomic
    counter per tile) adds the partials in split order, writes z and resets the counter to 0, so
    the result is deterministic and the next call (or CUDA-graph replay) starts from zero.
    """
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_t = tl.arange(0, BLOCK_T)
    n_start = pid_s * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    if USE_PDL:
        _prefetch_rows_l2(vt_ptr, offs_k, K, n_start, n_end, stride_vk, LINE, BLOCK_N)
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros((BLOCK_K, BLOCK_T), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        vt = _load_tile(vt_ptr, offs_k, offs_n, stride_vk, stride_vn, K, n_end)
        xt = _load_tile(x_ptr, offs_n, offs_t, stride_xn, stride_xt, n_end, T)
        acc = tl.dot(vt, xt, acc, input_precision=PRECISION)
    if splits > 1:
        # part: [splits, K, BLOCK_T] fp32, contiguous
        _store_tile(part_ptr + pid_s.to(tl.int64) * K * BLOCK_T, acc, part_ptr, offs_k, offs_t,
                    BLOCK_T, 1, K, BLOCK_T, HAS_BIAS=False)
        tl.debug_barrier()  # every thread's partial is stored before the counter moves
        arrived = tl.atomic_add(count_ptr + pid_k, 1, sem="acq_rel")
        if arrived == splits - 1:
            tl.debug_barrier()
            acc = tl.zeros((BLOCK_K, BLOCK_T), dtype=tl.float32)
            for s in range(0, splits):
                offsets = s * K * BLOCK_T + offs_k[:, None] * BLOCK_T + offs_t[None, :]
                acc += tl.load(part_ptr + offsets, mask=offs_k[:, None] < K, other=0.0,
                               cache_modifier=".cg")
            _store_tile(z_ptr, acc, z_ptr, offs_k, offs_t, stride_zk, stride_zt, K, T, HAS_BIAS=False)
            tl.atomic_xchg(count_ptr + pid_k, 0)
    else:
        _store_tile(z_ptr, acc, z_ptr, offs_k, offs_t, stride_zk, stride_zt, K, T, HAS_BIAS=False)


@triton.jit
def _expand_rows(acc, z_ptr, u_ptr, offs_m, offs_t, T, M, K, stride_zt, stride_zk, stride_um,
                 stride_uk, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += U[offs_m, :K] @ zᵀ[:K, offs_t]: the program's whole rows of U, k in BLOCK_K steps."""
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        u = _load_tile(u_ptr, offs_m, offs_k, stride_um, stride_uk, M, K)
        zt = _load_tile(z_ptr, offs_k, offs_t, stride_zk, stride_zt, K, T)
        acc = tl.dot(u.to(tl.float32), zt, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _decode_expand_kernel(
    z_ptr, u_ptr, z2_ptr, u2_ptr, bias_ptr, out_ptr,
    T, M, K, K2,
    stride_zt, stride_zk, stride_um, stride_uk, stride_u2m, stride_u2k, stride_ot, stride_om,
    HAS_BIAS: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr,
    PRECISION: tl.constexpr, USE_PDL: tl.constexpr, LINE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """outᵀ[m-tile, :T] = U[m-tile] @ zᵀ (+ bias); each program owns whole rows of U, so no
    partials and no reduction. ``GATED``: ``act(U z_gate) * (U2 z_up)`` (``ACTIVATION`` 1 SiLU,
    2 GELU-tanh); ``z2`` points at the up projection's columns of the same z."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_t = tl.arange(0, BLOCK_T)
    if USE_PDL:
        _prefetch_rows_l2(u_ptr, offs_m, M, 0, K, stride_um, LINE, BLOCK_K)
        if GATED:
            _prefetch_rows_l2(u2_ptr, offs_m, M, 0, K2, stride_u2m, LINE, BLOCK_K)
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.float32)
    acc = _expand_rows(acc, z_ptr, u_ptr, offs_m, offs_t, T, M, K, stride_zt, stride_zk,
                       stride_um, stride_uk, PRECISION, BLOCK_K)
    if GATED:
        up = tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.float32)
        up = _expand_rows(up, z2_ptr, u2_ptr, offs_m, offs_t, T, M, K2, stride_zt, stride_zk,
                          stride_u2m, stride_u2k, PRECISION, BLOCK_K)
        if ACTIVATION == 1:
            acc = acc * tl.sigmoid(acc)
        else:  # tanh(y) = 2 sigmoid(2y) - 1
            inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
            acc = acc * tl.sigmoid(2.0 * inner)
        acc = acc * up
    if HAS_BIAS:  # along m, the rows of this transposed tile
        acc += tl.load(bias_ptr + offs_m, mask=offs_m < M, other=0.0).to(tl.float32)[:, None]
    _store_tile(out_ptr, acc, out_ptr, offs_m, offs_t, stride_om, stride_ot, M, T, HAS_BIAS=False)


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


class _Workspace:
    """Buffers the decode shrink reuses on every call, one set per device: the fp32 ``z``, the
    split partials and the arrival counters (zeroed once; the kernel leaves them at zero).

    Nothing is allocated per call, so a captured CUDA graph replays with the same buffers. They
    only grow, and growing is refused while a graph is being captured: run the shapes once
    before capturing (a warm-up step does). Calls on one device share the buffers, so they must
    run in one stream's order, as a model's layers do.
    """

    def __init__(self):
        self._buffers = {}

    def get(self, device, z_numel, part_numel, counters):
        have = self._buffers.get(device)
        sizes = (z_numel, part_numel, counters)
        if have is None or any(b.numel() < size for b, size in zip(have, sizes)):
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "the Triton decode kernels need a larger workspace while a CUDA graph is being "
                    "captured; run the model once at these shapes before capturing")
            sizes = [max(size, 0 if have is None else b.numel()) for b, size in zip(have or (None,) * 3, sizes)]
            have = (torch.empty(sizes[0], device=device, dtype=torch.float32),
                    torch.empty(max(sizes[1], 1), device=device, dtype=torch.float32),
                    torch.zeros(max(sizes[2], 1), device=device, dtype=torch.int32))
            self._buffers[device] = have
        return have


_WORKSPACE = _Workspace()


def _use_pdl(device) -> bool:
    from lowrank_infer.kernels.lowrank_linear_op import get_pdl

    return (get_pdl() and not _INTERPRETED and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def _line(x) -> int:
    """Elements per 128-byte cache line."""
    return 128 // x.element_size()


def _block_t(T: int) -> int:
    return 16 if T <= 16 else 32


def _decode_shrink(x, Vt, cfg, precision):
    """``z = x @ Vtᵀ`` in fp32, ``[T, K]``, a view of the workspace (valid until the next call)."""
    # x: [T, n], Vt: [K, n] (any strides; rank-major rows read whole)
    T, n = x.shape
    K = Vt.shape[0]
    block_t, block_k = _block_t(T), cfg["BLOCK_K"]
    n_per_split = triton.cdiv(triton.cdiv(n, cfg["SPLIT_N"]), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    splits = triton.cdiv(n, n_per_split)
    k_tiles = triton.cdiv(K, block_k)
    z_buf, part, counts = _WORKSPACE.get(x.device, T * K, splits * K * block_t if splits > 1 else 0, k_tiles)
    z = z_buf[:T * K].view(T, K)
    use_pdl = _use_pdl(x.device)
    _decode_shrink_kernel[(k_tiles, splits)](
        x, Vt, z, part, counts, T, n, K, n_per_split, splits,
        x.stride(0), x.stride(1), Vt.stride(0), Vt.stride(1), z.stride(0), z.stride(1),
        PRECISION=precision, USE_PDL=use_pdl, LINE=_line(x), BLOCK_T=block_t, BLOCK_K=block_k,
        BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        launch_pdl=use_pdl,
    )
    return z


_ACTIVATION_CODES = {None: 0, "silu": 1, "gelu_tanh": 2}


def _decode_expand(z, U, bias, out, cfg, precision, up=None, activation=None):
    """``out = z @ Uᵀ (+ bias)``, or with ``up = (z_up, U_up)`` ``act(z @ Uᵀ) * (z_up @ U_upᵀ)``."""
    # z: [T, k] fp32 (a column slice of the workspace), U: [m, k], bias: [m] | None,
    # out: [T, m] (any strides: a slice of a grouped output), up: ([T, k2], [m, k2]) | None
    T, K = z.shape
    M = U.shape[0]
    z2, U2 = up if up is not None else (z, U)
    use_pdl = _use_pdl(z.device)
    _decode_expand_kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](
        z, U, z2, U2, out if bias is None else bias, out, T, M, K, z2.shape[1],
        z.stride(0), z.stride(1), U.stride(0), U.stride(1), U2.stride(0), U2.stride(1),
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, GATED=up is not None, ACTIVATION=_ACTIVATION_CODES[activation],
        PRECISION=precision, USE_PDL=use_pdl, LINE=_line(U), BLOCK_T=_block_t(T),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], launch_pdl=use_pdl,
    )


def _launch_decode(x, U, V, bias, out, cfgs, precision):
    # x: [T, n], U: [m, k], V: [n, k], bias: [m] | None, out: [T, m]
    for t0 in range(0, x.shape[0], DECODE_MAX_TOKENS):  # a forced path may get more tokens
        rows = slice(t0, t0 + DECODE_MAX_TOKENS)
        z = _decode_shrink(x[rows], V.T, cfgs["decode_shrink"], precision)
        _decode_expand(z, U, bias, out[rows], cfgs["decode_expand"], precision)


def _two_gemms(shrink, expand):
    """Runner of a two-GEMM path whose kernels take the ``shrink``/``expand`` configs."""

    def run(x, U, V, bias, out, cfgs, precision):
        # x: [T, n], U: [m, k], V: [n, k], bias: [m] | None, out: [T, m]
        z = torch.empty((x.shape[0], U.shape[1]), device=x.device, dtype=torch.float32)
        _launch_matmul(x, V, None, z, cfgs[shrink], precision)
        _launch_matmul(z, U.T, bias, out, cfgs[expand], precision)

    return run


_PATHS = {  # path -> (launcher, kernels whose configs it takes)
    "decode": (_launch_decode, ("decode_shrink", "decode_expand")),
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


def _config(kernel, x, m, k):
    """Config of ``kernel`` for ``x [T, n]`` through a layer of ``m`` outputs and rank ``k``."""
    name, sms = _device_info(x.device)
    return get_config(kernel, x.shape[0], m, x.shape[1], k, device_name=name, num_sms=sms,
                      elem_bytes=x.element_size())


def _configs(kernels, x, U, V, overrides):
    overrides = overrides or {}
    return {kernel: overrides.get(kernel) or _config(kernel, x, *U.shape) for kernel in kernels}


def _check_out(out: torch.Tensor, x: torch.Tensor, m: int) -> None:
    want = (*x.shape[:-1], m)
    if tuple(out.shape) != want or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {want} on {x.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")


def _check_runnable(x):
    if not (x.device.type == "cuda" or (x.device.type == "cpu" and _INTERPRETED)):
        raise RuntimeError(
            "the Triton kernels run on CUDA tensors, or on CPU tensors when "
            f"TRITON_INTERPRET=1 was set before triton was imported; got {x.device} tensors")
    if _INTERPRETED and x.dtype == torch.bfloat16:
        # The interpreter's bf16 tl.dot returns garbage (values off by 1e10), not an error.
        raise TypeError("Triton's CPU interpreter computes bfloat16 dots wrongly; use float16 or float32 "
                        "with TRITON_INTERPRET=1 (bfloat16 runs on CUDA)")


def _precision(x) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _guard(x):
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


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
    _check_runnable(x)
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
    bias = None if bias is None else bias.contiguous()
    with _guard(x):
        runner(x2d, U, V, bias, out.view(-1, m), cfgs, _precision(x))
    return out


def _shrink(x2d, V, m, precision):
    """``x2d @ V`` in fp32 for a group of ``m`` outputs: the decode shrink up to
    DECODE_MAX_TOKENS rows (``z`` then lives in the workspace), a tiled GEMM above."""
    T, k = x2d.shape[0], V.shape[1]
    if T <= DECODE_MAX_TOKENS:
        return _decode_shrink(x2d, V.T, _config("decode_shrink", x2d, m, k), precision)
    z = torch.empty((T, k), device=x2d.device, dtype=torch.float32)
    _launch_matmul(x2d, V, None, z, _config("shrink", x2d, m, k), precision)
    return z


def _expand(x2d, z, U, bias, out, precision):
    if x2d.shape[0] <= DECODE_MAX_TOKENS:
        _decode_expand(z, U, bias, out, _config("decode_expand", x2d, *U.shape), precision)
    else:
        _launch_matmul(z, U.T, bias, out, _config("expand", x2d, *U.shape), precision)


def launch_grouped(x, V, Us, bias=None):
    """``[x V_1 U_1ᵀ | x V_2 U_2ᵀ | …] (+ bias)``: one shrink over ``V = [V_1 | V_2 | …]``, then
    one expand per ``U_i`` into its columns of the output (inputs as ``check_grouped`` accepts)."""
    # x: [..., n], V: [n, Σk], Us: [m_i, k_i], bias: [Σm] | None
    _check_runnable(x)
    x2d = x.reshape(-1, x.shape[-1])
    widths = [U.shape[0] for U in Us]
    out = torch.empty((x2d.shape[0], sum(widths)), device=x.device, dtype=x.dtype)
    if x2d.shape[0]:
        with _guard(x):
            z = _shrink(x2d, V, sum(widths), _precision(x))
            col = row = 0
            for U, width in zip(Us, widths):
                piece_bias = None if bias is None else bias[row:row + width]
                _expand(x2d, z[:, col:col + U.shape[1]], U, piece_bias, out[:, row:row + width], _precision(x))
                col, row = col + U.shape[1], row + width
    return out.view(*x.shape[:-1], sum(widths))


def launch_gated(x, V, U_gate, U_up, up_start, activation):
    """``act(x V_g U_gateᵀ) * (x V_u U_upᵀ)`` (inputs as ``check_gated`` accepts): one shrink; up
    to DECODE_MAX_TOKENS rows one expand that reads both ``U`` and writes only the product."""
    # x: [..., n], V: [n, K], U_gate: [m, k_g] (z columns [0, k_g)), U_up: [m, k_u] (z columns
    # [up_start, up_start + k_u)), activation: "silu" | "gelu_tanh"
    _check_runnable(x)
    x2d = x.reshape(-1, x.shape[-1])
    m = U_gate.shape[0]
    out = torch.empty((x2d.shape[0], m), device=x.device, dtype=x.dtype)
    if x2d.shape[0]:
        with _guard(x):
            z = _shrink(x2d, V, m, _precision(x))
            z_gate, z_up = z[:, :U_gate.shape[1]], z[:, up_start:up_start + U_up.shape[1]]
            if x2d.shape[0] <= DECODE_MAX_TOKENS:
                cfg = _config("decode_expand", x2d, *U_gate.shape)
                _decode_expand(z_gate, U_gate, None, out, cfg, _precision(x), (z_up, U_up), activation)
            else:  # prefill sizes: two tiled GEMMs in fp32, the activation in torch
                gate = torch.empty((x2d.shape[0], m), device=x.device, dtype=torch.float32)
                up = torch.empty_like(gate)
                _expand(x2d, z_gate, U_gate, None, gate, _precision(x))
                _expand(x2d, z_up, U_up, None, up, _precision(x))
                out.copy_(_ACTIVATIONS[activation](gate) * up)
    return out.view(*x.shape[:-1], m)
