"""Shared by the model tests: weights and inputs that make a comparison mean something."""

import torch


def randomised(model, seed=0, scale=0.1):
    """`model` with `scale` times seeded noise added to every weight. A fresh model's norms are all ones and
    its biases all zeros, so a comparison on it would miss a wrong norm gain or bias."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return model


def ids_for(config, batch=3, seed=0):
    """`batch` sequences of random pixel tokens, a whole image each, seeded."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.n_clusters, (batch, config.n_positions), generator=generator)
