"""Our copy of ggml's type tables equals the `gguf` package's (llama.cpp's own definitions)."""

import gguf

from gemma3.formats.ggml_types import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType


def test_type_codes_and_block_sizes_equal_the_gguf_package():
    for ours in GGMLQuantizationType:
        theirs = gguf.GGMLQuantizationType[ours.name]
        assert ours.value == theirs.value
        assert GGML_QUANT_SIZES[ours] == gguf.GGML_QUANT_SIZES[theirs]
    assert [(v.name, v.value) for v in GGUFValueType] == [(v.name, v.value) for v in gguf.GGUFValueType]


def test_reading_a_model_does_not_import_the_gguf_package():
    import subprocess
    import sys

    code = ("import sys; from gemma3.inference.load import load; load(None); "
            "print('gguf' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
