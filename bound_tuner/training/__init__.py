"""Training: the loops of score models and VAEs, vmapped packs, and the reverse-time sampler."""
