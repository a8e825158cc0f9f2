"""Pyro models with gates on the units of a network."""
