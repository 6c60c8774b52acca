"""Noise schedules (betas, respacing, timestep grids) and pure-JAX sampler steps."""
