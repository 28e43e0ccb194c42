"""Training: one generic loop for every family, its optimiser and schedule."""
