"""Serving: predict functions built from checkpoints."""
