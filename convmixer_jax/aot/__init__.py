"""Ahead-of-time compiles for TPU and GPU targets, without the hardware."""
