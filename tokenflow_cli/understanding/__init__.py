"""LLaVA-style understanding from the tokenizer's features: recipe schema, model, feature
sources, conversations, data, run folders and pipeline, training stage, VQA evaluation."""
