"""The tiny base policies (a character-level Llama, a BPE Qwen2), their warm-start and evaluation, and model loading."""
