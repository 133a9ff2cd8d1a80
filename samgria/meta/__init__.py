"""Gradient-based meta-learning: MAML, FOMAML, Reptile, MetaSGD, ANIL."""
