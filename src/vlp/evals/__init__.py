"""Evaluation tasks. Each receives predict functions and returns named metrics."""
