"""Objectives: a family's model plus losses and weights -> named losses for the generic trainer."""
