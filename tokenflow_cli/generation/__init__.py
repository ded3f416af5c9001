"""Next-scale text-to-image generation over the tokenizer's codes: recipe schema, model and LM
backbones, sampling, training data, run folders and pipeline, training stage, GenEval."""
