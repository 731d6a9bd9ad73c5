"""The iterative L∞ loop shared by every gradient attack on a metric.

A subclass says only what differs: its loss (to be *ascended*), whether it starts at a
random point of the ε-ball, and its momentum. The loop itself -- projected sign-gradient
steps, gradient normalisation for momentum, EOT averaging -- is written once here.

Queries may be images (B, 3, H, W) or video tracklets (B, T, 3, H, W): every step and the
projection are elementwise, so each frame of a tracklet gets its own perturbation within ε.
"""

from __future__ import annotations

import dataclasses

import torch

from reidbench.attack import Attack, AttackContext
from reidbench.features import embed


def private_view(ctx: AttackContext) -> AttackContext:
    """The context an attack works on: its own ``extra`` and a copy of the generator in its
    current state. Random draws (start point, guides) still come from ``ctx.generator`` but do
    not advance the caller's, so the same context gives the same output however often the
    attack is called (the runner seeds one generator per batch anyway)."""
    generator = torch.Generator(device=ctx.generator.device)
    generator.set_state(ctx.generator.get_state())
    return dataclasses.replace(ctx, generator=generator, extra=dict(ctx.extra))


class IterativeMetricAttack(Attack):
    """Projected (I-)FGSM on a feature-space loss.

    Momentum follows MI-FGSM (Dong et al., CVPR 2018) as adapted to metrics by Bai et al.
    (2019): each step's gradient is divided by its mean absolute value (per image) before it
    is accumulated, ``g ← μ·g + ∇/mean|∇|``, and the step follows ``sign(g)``.
    ``eot_samples > 1`` averages the gradient over that many forward passes, which is EOT
    (Athalye et al., ICML 2018) when the model's input transform is stochastic.
    """

    random_start = False
    momentum = 0.0

    def __init__(self, eps, step, iterations, seed=0, eot_samples: int = 1, **params):
        super().__init__(eps, step, iterations, seed, **params)
        self.eot_samples = int(eot_samples)

    def describe(self) -> dict:
        return {**super().describe(), "random_start": self.random_start, "momentum": self.momentum,
                "eot_samples": self.eot_samples}

    def loss(self, feats: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        """Per-query objective to maximise, shape (B,)."""
        raise NotImplementedError

    def prepare(self, model, queries: torch.Tensor, ctx: AttackContext) -> AttackContext:
        """Hook to compute guides once before the loop."""
        return ctx

    def begin_iteration(self, model, queries: torch.Tensor, ctx: AttackContext, iteration: int) -> AttackContext:
        """Hook called at the start of every iteration, before its gradient, with the clean
        ``queries``: attacks whose guides are re-drawn at each step (LTA) refresh them here."""
        return ctx

    def gradient(self, model, x: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        grad = torch.zeros_like(x)
        for _ in range(self.eot_samples):
            x_var = x.detach().requires_grad_(True)
            objective = self.loss(embed(model, x_var), ctx).sum()
            grad += torch.autograd.grad(objective, x_var)[0]
        return grad / self.eot_samples

    def perturb(self, model, queries: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        model.eval()
        ctx = self.prepare(model, queries, private_view(ctx))
        x0 = queries.detach()
        if self.random_start:
            noise = torch.rand(x0.shape, generator=ctx.generator).to(x0.device)
            delta = (noise * 2 - 1) * self.eps
        else:
            delta = torch.zeros_like(x0)
        delta = (x0 + delta).clamp(0, 1) - x0
        accumulated = torch.zeros_like(x0)
        for iteration in range(self.iterations):
            ctx = self.begin_iteration(model, x0, ctx, iteration)
            grad = self.gradient(model, x0 + delta, ctx)
            if self.momentum > 0:
                # per query: over all of its pixels, every frame of a tracklet included
                scale = grad.abs().mean(dim=tuple(range(1, grad.dim())), keepdim=True).clamp_min(1e-12)
                accumulated = self.momentum * accumulated + grad / scale
                direction = accumulated.sign()
            else:
                direction = grad.sign()
            delta = (delta + self.step * direction).clamp(-self.eps, self.eps)
            delta = (x0 + delta).clamp(0, 1) - x0
        return x0 + delta
