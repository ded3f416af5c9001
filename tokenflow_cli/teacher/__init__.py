"""The tiny CLIP teacher (contrastive image-text training on the shapes world) the tiny
tokenizer distils from: recipe schema, training stage, evaluation."""
