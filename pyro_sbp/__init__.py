"""Bayesian structured pruning of neural networks with Pyro."""
