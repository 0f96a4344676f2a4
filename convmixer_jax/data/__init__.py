"""Datasets for convmixer_jax."""
