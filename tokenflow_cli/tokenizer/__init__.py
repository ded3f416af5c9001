"""The TokenFlow tokenizer: dual encoders, shared-index multi-scale quantizer, decoders; its
recipe schema, codes format, tokenize/reconstruct pipelines, converter, training stage, losses,
usage statistics and rFID."""
