"""Model modules: pixel/semantic encoders and decoders, quantizer, tokenizer, generator, LLaVA."""
