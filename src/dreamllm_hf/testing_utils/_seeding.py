"""Seeded construction shared by the tiny-component builders."""

import torch


def seeded(seed: int, build):
    """`build()` with the global RNG seeded, and the global RNG left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
