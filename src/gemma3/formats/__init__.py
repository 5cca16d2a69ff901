"""What lies on disk: the GGUF reader, GGML block decoding, checkpoint names and conventions
(GGUF, safetensors, llama.cpp's mmproj), and the tokenizer."""
