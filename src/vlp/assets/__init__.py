"""What a model is read and written with, kept beside its weights: tokenizers and image preprocessing."""
