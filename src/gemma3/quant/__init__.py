"""Weight quantization: the report's formats (per-channel int4, per-block int4, switched fp8, as in
its Table 3) and GGUF's, applied as a module swap.

- `formats.py`: quantize / dequantize per format, `fake_quant` (straight-through) for QAT
- `sfp8.py`: gemma.cpp's switched floating point codec
- `apply.py`: recipes and the module swap (`quantize_model`)
- `gguf_writer.py`, `store.py`: GGUF files for llama.cpp; safetensors directories for every format
  (`inference/convert.py` runs `gemma3 quantize`: load, quantize, write)
"""

from .apply import RECIPES, Recipe, parse_recipe, quantize_model
from .formats import FORMATS, QuantError, Quantized, dequantize, fake_quant, get_format, quantize

__all__ = ["FORMATS", "RECIPES", "Quantized", "QuantError", "Recipe", "dequantize", "fake_quant", "get_format",
           "parse_recipe", "quantize", "quantize_model"]
