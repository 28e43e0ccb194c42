"""Data: tokenizers, image transforms, caption sources and the training pipeline."""
