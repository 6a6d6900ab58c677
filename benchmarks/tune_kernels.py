"""Tune the Triton low-rank kernels on this GPU and write ``kernels/configs/<GPU>.json``.

For every layer shape (m, n, k) and token count T, the path that ``select_path`` picks is
timed with each candidate config, after checking the candidate's output against a float64
reference. The fastest correct config is stored under the shape's bucket key; entries for
other shapes are kept, so runs can be split. Timing replays a CUDA graph
(``triton.testing.do_bench_cudagraph``, median) so that small decode shapes measure the
GPU, not Python launch overhead. Each line also times the other paths (current configs)
and torch's two matmuls, to check the path thresholds.

    python benchmarks/tune_kernels.py                        # default shapes
    python benchmarks/tune_kernels.py --shapes 4096,4096,1024 --tokens 1 16 512
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing

from lowrank_infer.kernels import launch_config

DEFAULT_SHAPES = [  # (m, n, k): SmolLM2-135M and Llama-7B-sized projections at keep ~0.5
    (576, 576, 144), (1536, 576, 208), (576, 1536, 208),
    (4096, 4096, 1024), (11008, 4096, 1488), (4096, 11008, 1488),
]
DEFAULT_TOKENS = [1, 4, 16, 64, 256, 1024, 4096]
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}
_PATH_KERNELS = {"decode": ("decode_shrink", "decode_expand"), "prefill": ("prefill",),
                 "shrink_expand": ("shrink", "expand")}
_GEMM_TILES = [  # (BLOCK_R, BLOCK_C, BLOCK_D, num_warps, num_stages), tutorial-style
    (128, 256, 64, 8, 3), (64, 256, 32, 4, 4), (128, 128, 32, 4, 4), (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4), (128, 32, 32, 4, 4), (64, 64, 64, 4, 3), (32, 64, 32, 4, 5),
    (128, 128, 64, 8, 3), (64, 64, 32, 2, 5), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3),
]


def _decode_shrink_candidates(n, k, num_sms):
    """Rank rows of Vᵀ per program, run length along n, warps and stages, and n split so that
    one, two or four programs per SM run."""
    for block_k, block_n, (warps, stages) in itertools.product(
            (64, 128), (64, 128, 256), ((4, 3), (4, 4), (8, 4))):
        k_tiles = -(-k // block_k)
        for per_sm in (1, 2, 4):
            split = max(1, min(per_sm * num_sms // k_tiles, n // block_n))
            yield {"BLOCK_K": block_k, "BLOCK_N": block_n, "SPLIT_N": split, "num_warps": warps,
                   "num_stages": stages}


def _decode_expand_candidates():
    """Rows of U per program and run length along k."""
    for block_m, block_k, (warps, stages) in itertools.product(
            (16, 32, 64), (64, 128, 256), ((4, 3), (4, 4), (8, 4))):
        yield {"BLOCK_M": block_m, "BLOCK_K": block_k, "num_warps": warps, "num_stages": stages}


def _prefill_candidates(T, m, n, k, num_sms):
    k_pad = max(16, 1 << (k - 1).bit_length())
    for block_t, block_m, warps, max_groups in itertools.product(
            (16, 32, 64, 128), (64, 128), (4, 8), (None, 16, 4)):
        if block_t * k_pad > 16384:  # the fp32 intermediate would spill registers
            continue
        # Fewer m-groups than SMs allow: each group re-reads all of V (L2) to rebuild z.
        groups = launch_config.m_groups(m, block_m, -(-T // block_t), num_sms, max_groups)
        yield {"BLOCK_T": block_t, "BLOCK_N": 64 if k_pad <= 128 else 32, "BLOCK_M": block_m,
               "M_GROUPS": groups, "num_warps": warps, "num_stages": 3}


def _gemm_candidates():
    for block_r, block_c, block_d, warps, stages in _GEMM_TILES:
        yield {"BLOCK_R": block_r, "BLOCK_C": block_c, "BLOCK_D": block_d, "GROUP_R": 8,
               "SPLIT_D": 1, "num_warps": warps, "num_stages": stages}


def _bench(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")


def _time_config(launch, inputs, ref, path, configs):
    """Median ms of one config; None when it does not compile or launch (e.g. out of shared
    memory); AssertionError when it runs but disagrees with the reference (a kernel bug)."""
    x, U, V, b = inputs
    out = torch.full((x.shape[0], U.shape[0]), float("nan"), device=x.device, dtype=x.dtype)
    try:
        launch(x, U, V, b, path=path, out=out, configs=configs)
    except Exception as err:  # noqa: BLE001  (Triton raises several types for resource limits)
        print(f"    skip {configs}: {type(err).__name__}: {err}", file=sys.stderr)
        return None
    err = ((out.double() - ref).norm() / ref.norm()).item()
    if not err < TOLERANCE[x.dtype]:
        raise AssertionError(f"{path} {configs}: relative error {err:.3g} (kernel bug)")
    return _bench(lambda: launch(x, U, V, b, path=path, out=out, configs=configs))


def _tune_path(launch, inputs, ref, path, current, candidates):
    """(ms, configs) of the best configs for ``path``, by coordinate descent over its kernels
    (shrink first, then expand with the best shrink); ``current`` is always a candidate."""
    best = {kernel: current[kernel] for kernel in _PATH_KERNELS[path]}
    for kernel in best:
        timed = []
        for cfg in [current[kernel], *candidates[kernel]]:
            ms = _time_config(launch, inputs, ref, path, {**best, kernel: cfg})
            if ms is not None:
                timed.append((ms, cfg))
        if not timed:
            raise RuntimeError(f"no {kernel} candidate ran for this shape")
        ms, best[kernel] = min(timed, key=lambda entry: entry[0])
    return ms, best


def _tune_shape(T, m, n, k, dtype, table, device_name, num_sms, device="cuda"):
    """Tune the path ``select_path`` picks and record its configs in ``table``; time the other
    paths with their current configs, so the path thresholds can be checked too."""
    from lowrank_infer.kernels.triton_lowrank import launch

    gen = torch.Generator(device=device).manual_seed(0)
    inputs = (torch.randn(T, n, device=device, generator=gen).to(dtype),
              (torch.randn(m, k, device=device, generator=gen) / k**0.5).to(dtype),
              (torch.randn(k, n, device=device, generator=gen) / n**0.5).to(dtype).T,  # rank-major
              torch.randn(m, device=device, generator=gen).to(dtype))
    x, U, V, b = inputs
    ref = x.double() @ V.double() @ U.double().T + b.double()
    # What the package picks today (tuned table or heuristics): the baseline to beat.
    current = {kernel: launch_config.get_config(kernel, T, m, n, k, device_name=device_name,
                                                num_sms=num_sms, elem_bytes=x.element_size())
               for kernel in launch_config.KERNELS}
    path = launch_config.select_path(T, k)
    before_ms = _time_config(launch, inputs, ref, path, current)
    candidates = {"decode_shrink": _decode_shrink_candidates(n, k, num_sms),
                  "decode_expand": _decode_expand_candidates(),
                  "prefill": _prefill_candidates(T, m, n, k, num_sms),
                  "shrink": _gemm_candidates(), "expand": _gemm_candidates()}
    ms, best = _tune_path(launch, inputs, ref, path, current, candidates)
    for kernel, cfg in best.items():
        table.setdefault(kernel, {})[launch_config.bucket_key(T, m, n, k)] = cfg
    others = {other: _time_config(launch, inputs, ref, other, current)
              for other in launch_config.PATHS
              if other != path and (other != "prefill" or k <= launch_config.FUSED_MAX_RANK)}
    others["torch"] = _bench(lambda: (x @ V) @ U.T + b)
    weight_gb = k * (m + n) * x.element_size() / 1e9
    tflops = 2 * T * k * (m + n) / 1e12
    print(f"T={T:5d} m={m:5d} n={n:5d} k={k:5d} {path:13s} tuned {ms * 1e3:8.1f} us "
          f"(before {before_ms * 1e3:8.1f} us; weights {weight_gb / (ms / 1e3):6.0f} GB/s, "
          f"{tflops / (ms / 1e3):6.1f} TFLOP/s) | untuned: "
          + ", ".join(f"{name} {t * 1e3:.1f} us" for name, t in others.items() if t is not None)
          + f" | {best}", flush=True)


def _write_atomically(path: Path, table: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", metavar="M,N,K",
                        type=lambda s: tuple(int(v) for v in s.split(",")), default=DEFAULT_SHAPES)
    parser.add_argument("--tokens", nargs="+", type=int, default=DEFAULT_TOKENS)
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--output", type=Path, help="default: kernels/configs/<GPU name>.json")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = _parse_args(argv)
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("tune_kernels.py needs a CUDA GPU and TRITON_INTERPRET unset")
    props = torch.cuda.get_device_properties(0)
    output = args.output or launch_config.config_file(props.name)
    table = json.loads(output.read_text()) if output.exists() else {}
    output.parent.mkdir(parents=True, exist_ok=True)
    table.update(device=props.name, triton=triton.__version__, torch=torch.__version__)
    start = time.perf_counter()
    for (m, n, k), T in itertools.product(args.shapes, args.tokens):
        _tune_shape(T, m, n, k, getattr(torch, args.dtype), table, props.name,
                    props.multi_processor_count)
        _write_atomically(output, table)  # keep progress if the run is cut short
    print(f"wrote {output} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
