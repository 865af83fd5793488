"""The tiny base policy: character tokenizer, Llama builder, supervised warm-start, evaluation."""
