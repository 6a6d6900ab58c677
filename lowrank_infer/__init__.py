"""lowrank-infer: compress Hugging Face LLMs by whitened SVD and run them with fused kernels."""

from lowrank_infer.hf_quantizer import register as _register
from lowrank_infer.module import LowRankLinear
from lowrank_infer.allocation import METHODS, ARAConfig, DRankConfig, MethodConfig, RankPlan, UniformConfig
from lowrank_infer.io import load_compressed, save_compressed
from lowrank_infer.packing import PackReport, pack_model
from lowrank_infer.surgery import dequantize
from lowrank_infer.compress import CompressResult, analyze, compress, config_for
from lowrank_infer.data import calibration_ids, load_text, tokenize_text
from lowrank_infer.evaluate import perplexity
from lowrank_infer.models import load_model

# Compressed checkpoints load through AutoModelForCausalLM.from_pretrained once this ran.
_register()

__version__ = "0.1.0"

__all__ = [
    "ARAConfig",
    "CompressResult",
    "DRankConfig",
    "LowRankLinear",
    "METHODS",
    "MethodConfig",
    "PackReport",
    "RankPlan",
    "UniformConfig",
    "analyze",
    "calibration_ids",
    "compress",
    "config_for",
    "dequantize",
    "load_compressed",
    "load_model",
    "load_text",
    "pack_model",
    "perplexity",
    "save_compressed",
    "tokenize_text",
]
