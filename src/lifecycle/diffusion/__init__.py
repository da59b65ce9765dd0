"""Diffusion and flow-matching math: noising processes, prediction targets and loss weights."""
