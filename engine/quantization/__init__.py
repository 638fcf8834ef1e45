"""AWQ and GPTQ checkpoints: their config (config.py), their tensors (formats.py, packing.py), the
quantized linear method (method.py) and the one quantized matmul call (matmul.py)."""
from engine.quantization.config import (
    QuantConfig,
    from_hf_config,
    normalize_option,
    resolve,
)
from engine.quantization.formats import QuantWeights
from engine.quantization.matmul import quant_matmul

__all__ = ["QuantConfig", "QuantWeights", "from_hf_config", "normalize_option", "quant_matmul", "resolve"]
