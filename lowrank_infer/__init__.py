"""lowrank-infer: compress Hugging Face LLMs by whitened SVD and run them with fused kernels."""

from lowrank_infer.hf_quantizer import register as _register
from lowrank_infer.module import LowRankLinear
from lowrank_infer.io import load_compressed, save_compressed
from lowrank_infer.compress import CompressConfig, compress

# Compressed checkpoints load through AutoModelForCausalLM.from_pretrained once this ran.
_register()

__version__ = "0.1.0"

__all__ = ["CompressConfig", "LowRankLinear", "compress", "load_compressed", "save_compressed"]
