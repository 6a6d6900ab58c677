"""Path selection and launch configs for the Triton low-rank kernels.

Pure Python (no Triton import), so the rules can be unit-tested anywhere. A config is a
dict of the kernel's ``BLOCK_*`` constexprs plus ``num_warps``/``num_stages`` and, for the
fused prefill kernel, ``M_GROUPS``: into how many program groups the m axis is split (a
count, not a width, so that it carries over to a nearby shape); the GEMM kernels' (shrink,
expand) ``SPLIT_D`` is likewise a count: into how many pieces their inner dimension is split
(partials summed by a second kernel) when the output tiles alone leave SMs idle, and
``GROUP_R`` how many row tiles share a column sweep. The decode shrink's ``SPLIT_N`` splits n
the same way, its partials summed inside the kernel; the decode expand never splits. Tuned configs come from
``configs/<GPU name>.json`` (written by ``benchmarks/tune_kernels.py``, which times 16-bit
inputs); a shape missing from the table uses the nearest tuned shape. fp32 inputs, whose tiles
take twice the shared memory, and a GPU without a table use the rule-of-thumb heuristics below.

Table layout::

    {"device": "...", "triton": "...",
     "decode_shrink": {"T=1,m=4096,n=4096,k=1024": {"BLOCK_K": 64, ..., "num_warps": 4}},
     "decode_expand": {...}, "prefill": {...}, "shrink": {...}, "expand": {...}}
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

__all__ = [
    "CONFIG_DIR",
    "DECODE_MAX_TOKENS",
    "FUSED_MAX_RANK",
    "KERNELS",
    "PATHS",
    "bucket_key",
    "config_file",
    "get_config",
    "m_groups",
    "select_path",
]

CONFIG_DIR = Path(__file__).parent / "configs"

# Up to this many tokens the op is memory-bound on the weights (decode, small batches):
# the decode path splits both GEMMs over programs so that every SM streams weights. At 17-32
# tokens the tiled paths' few large tiles still leave most SMs idle (benchmarks/results/h100/).
DECODE_MAX_TOKENS = 32
# Largest rank the fused prefill kernel keeps on chip: its fp32 [BLOCK_T, next_pow2(k)]
# intermediate lives in registers, and past 256 columns it spills even at BLOCK_T=32.
FUSED_MAX_RANK = 256

PATHS = ("decode", "prefill", "shrink_expand")
# Tuned kernels: the two-GEMM paths have two each, tuned separately.
KERNELS = ("decode_shrink", "decode_expand", "prefill", "shrink", "expand")

_GEMM_KEYS = ("BLOCK_R", "BLOCK_C", "BLOCK_D", "GROUP_R", "SPLIT_D")
_REQUIRED_KEYS = {
    "decode_shrink": ("BLOCK_K", "BLOCK_N", "SPLIT_N"),
    "decode_expand": ("BLOCK_M", "BLOCK_K"),
    "prefill": ("BLOCK_T", "BLOCK_N", "BLOCK_M", "M_GROUPS"),
    "shrink": _GEMM_KEYS,
    "expand": _GEMM_KEYS,
}


def select_path(num_tokens: int, rank: int) -> str:
    """Pick the kernel path for ``num_tokens`` rows of activations and rank ``rank``."""
    if num_tokens <= DECODE_MAX_TOKENS:
        return "decode"
    if rank <= FUSED_MAX_RANK:
        return "prefill"
    return "shrink_expand"


def bucket_key(num_tokens: int, m: int, n: int, k: int) -> str:
    """The JSON key of a shape: ``"T=..,m=..,n=..,k=.."``."""
    return f"T={num_tokens},m={m},n={n},k={k}"


def config_file(device_name: str) -> Path:
    """Where the tuned table of GPU ``device_name`` lives (spaces become underscores)."""
    return CONFIG_DIR / f"{device_name.replace(' ', '_')}.json"


def get_config(
    kernel: str, num_tokens: int, m: int, n: int, k: int, *, device_name: str, num_sms: int,
    elem_bytes: int,
) -> dict:
    """Launch config of ``kernel`` for a shape: nearest tuned entry, else heuristics.

    For the GEMM kernels the shape is still the layer's (T, m, n, k), so one table key
    describes the whole op. The returned dict is shared (cached): do not modify it.
    """
    return _config(kernel, num_tokens, m, n, k, str(config_file(device_name)), num_sms, elem_bytes)


@functools.lru_cache(maxsize=4096)
def _config(kernel, num_tokens, m, n, k, table_path, num_sms, elem_bytes):
    # Cached because launches repeat the same few shapes and this is Python time on every
    # call; keyed by the table's path so that another table (tests, tuning) is looked up anew.
    # The tables are tuned on 16-bit inputs: their tiles may not fit shared memory in fp32.
    table = _load_table(table_path).get(kernel) if elem_bytes == 2 else None
    if table:
        return _nearest(table, (num_tokens, m, n, k))
    return _HEURISTICS[kernel](num_tokens, m, n, k, num_sms=num_sms, elem_bytes=elem_bytes)


@functools.lru_cache(maxsize=None)
def _load_table(path: str) -> dict:
    """Parsed table ``{kernel: [((T, m, n, k), config), ...]}``; empty if no file."""
    file = Path(path)
    if not file.exists():
        return {}
    raw = json.loads(file.read_text())
    return {kernel: [(_parse_key(key), _checked(kernel, key, cfg))
                     for key, cfg in raw[kernel].items()]
            for kernel in KERNELS if kernel in raw}


def _parse_key(key: str) -> tuple[int, int, int, int]:
    """``"T=1,m=4096,n=4096,k=1024"`` → ``(1, 4096, 4096, 1024)``; exactly these four, each >= 1."""
    try:
        fields = dict(part.split("=") for part in key.split(","))
        shape = tuple(int(fields[name]) for name in ("T", "m", "n", "k"))
    except (KeyError, ValueError):
        shape = None
    if shape is None or len(fields) != 4 or min(shape) < 1:
        raise ValueError(f"tuned config key {key!r} must be 'T=..,m=..,n=..,k=..' with positive integers")
    return shape


def _checked(kernel: str, key: str, cfg: dict) -> dict:
    """Reject a malformed tuned entry at load time rather than at kernel compile or launch time."""
    required = (*_REQUIRED_KEYS[kernel], "num_warps", "num_stages")
    missing = [name for name in required if name not in cfg]
    if missing:
        raise ValueError(f"tuned config {kernel}[{key}] lacks {missing}")
    not_positive = [name for name in required if not _positive_int(cfg[name])]
    if not_positive:
        raise ValueError(f"tuned config {kernel}[{key}]: {not_positive} must be positive integers")
    bad = [name for name in required if name.startswith("BLOCK_") and (cfg[name] < 16 or cfg[name] & (cfg[name] - 1))]
    if cfg["num_warps"] & (cfg["num_warps"] - 1):
        bad.append("num_warps")
    if bad:
        raise ValueError(f"tuned config {kernel}[{key}]: {bad} must be powers of two (BLOCK_* >= 16)")
    return cfg


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _nearest(table: list, shape: tuple[int, ...]) -> dict:
    """Config of the entry closest in log2 space: shapes scale multiplicatively."""

    def distance(entry):
        return sum(abs(math.log2(a) - math.log2(b)) for a, b in zip(entry[0], shape))

    return min(table, key=distance)[1]


def _pow2_block(dim: int, cap: int) -> int:
    """Power of two >= 16 (tl.dot's minimum on GPU), <= ``cap``, no wider than ``dim`` needs."""
    return max(16, min(cap, 1 << (max(dim, 1) - 1).bit_length()))


def _prefill_heuristic(num_tokens, m, n, k, *, num_sms, elem_bytes):
    k_pad = _pow2_block(k, FUSED_MAX_RANK)
    # The fp32 [BLOCK_T, k_pad] intermediate stays in registers: 8K elements (32 KB) over 8
    # warps compiles without spills on sm_90 for 16-bit inputs; fp32 inputs, which multiply on
    # the CUDA cores (no tensor-core fragments), get a quarter: half spills with rank-major V. The V [BLOCK_N, k_pad] and U [k_pad, BLOCK_M] tiles are
    # held to 8K elements as well: at k_pad = 256 a 64-wide U tile spills on sm_90
    # (tests/kernels/test_sm90_compile.py checks every regime).
    budget = 8192 if elem_bytes == 2 else 2048
    block_t = _pow2_block(num_tokens, max(16, min(64, budget // k_pad)))
    tile_width = min(64, 8192 // k_pad)
    block_m = _pow2_block(m, tile_width)
    return {"BLOCK_T": block_t, "BLOCK_N": _pow2_block(n, tile_width), "BLOCK_M": block_m,
            # Recomputing the intermediate costs a pass over x and V per program, so a
            # program covers all of m unless too few token tiles occupy the SMs.
            "M_GROUPS": m_groups(m, block_m, -(-num_tokens // block_t), num_sms),
            "num_warps": 8 if block_t * k_pad >= 4096 else 4, "num_stages": 3}


def m_groups(
    m: int, block_m: int, programs: int, num_sms: int, max_groups: int | None = None
) -> int:
    """As many m-groups (at least 1, at most ``max_groups`` and the m-tile count) as fit in
    one wave of ``num_sms`` beside ``programs`` programs along the other grid axes."""
    m_tiles = -(-m // block_m)
    return max(1, min(m_tiles, max_groups or m_tiles, num_sms // programs))


def _split(tiles: int, inner: int, block_d: int, num_sms: int) -> int:
    """Pieces to split the inner dimension into so that ``tiles`` output tiles make about two
    waves of programs, keeping at least two BLOCK_D steps per piece."""
    return max(1, min(2 * num_sms // tiles, inner // (2 * block_d)))


def _gemm_heuristic(rows, cols, inner, *, num_sms, elem_bytes):
    """Tutorial-style tiled GEMM config for c[rows, cols] = a[rows, inner] @ b[inner, cols].

    fp32 inputs multiply in full fp32 on the CUDA cores rather than on tensor cores, which
    takes more registers per output: at 4 warps the 64 x 128 tile spills on sm_90, so 8.
    """
    block_r, block_c, block_d = _pow2_block(rows, 64), _pow2_block(cols, 128), _pow2_block(inner, 32)
    tiles = -(-rows // block_r) * -(-cols // block_c)
    return {"BLOCK_R": block_r, "BLOCK_C": block_c, "BLOCK_D": block_d, "GROUP_R": 8,
            "SPLIT_D": _split(tiles, inner, block_d, num_sms), "num_warps": 8 if elem_bytes == 4 else 4,
            "num_stages": 3}


def _decode_shrink_heuristic(num_tokens, m, n, k, *, num_sms, elem_bytes):
    """Decode shrink: 64 rank rows of Vᵀ per program (the smallest ``wgmma`` M) and n split so
    that about one program per SM streams an equal share of Vᵀ, read in runs of 512 bytes up to
    16 tokens and of 256 bytes (with 8 warps) above. These are the choices the tuner made on an
    H200 for LLaMA-2-7B's projections at keep 0.6 (``benchmarks/results/h200/tune-*.log``): there
    they ran 1.2-1.7x faster than the previous rules (two programs per SM, 256-byte runs)."""
    block_k = _pow2_block(k, 64)
    wide = num_tokens <= 16
    block_n = (512 if wide else 256) // elem_bytes
    k_tiles = -(-k // block_k)
    splits = max(1, min(num_sms // k_tiles, n // (2 * block_n)))
    return {"BLOCK_K": block_k, "BLOCK_N": block_n, "SPLIT_N": splits, "num_warps": 4 if wide else 8,
            "num_stages": 4 if elem_bytes == 2 else 3}


def _decode_expand_heuristic(num_tokens, m, n, k, *, num_sms, elem_bytes):
    """Decode expand: each program owns whole rows of U (no split, no reduction): 32 rows where
    that still leaves a program for every other SM, else 16; read along k in 256-byte runs up to
    16 tokens and 128-byte runs above, 4 warps (as tuned on the H200, see the shrink). The short
    runs at 32 tokens also keep the gated variant's two fp32 accumulators out of local memory."""
    block_m = 32 if -(-m // 32) >= num_sms // 2 else 16
    run_bytes = 256 if num_tokens <= 16 else 128
    return {"BLOCK_M": block_m, "BLOCK_K": _pow2_block(k, run_bytes // elem_bytes),
            "num_warps": 4, "num_stages": 4 if elem_bytes == 2 else 3}


_HEURISTICS = {
    "decode_shrink": _decode_shrink_heuristic,
    "decode_expand": _decode_expand_heuristic,
    "prefill": _prefill_heuristic,
    "shrink": lambda t, m, n, k, **kw: _gemm_heuristic(t, k, n, **kw),
    "expand": lambda t, m, n, k, **kw: _gemm_heuristic(t, m, k, **kw),
}
