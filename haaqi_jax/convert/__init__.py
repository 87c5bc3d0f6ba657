"""Checkpoint converters from PyTorch; the only package in haaqi_jax that imports torch."""
