"""Adaptive white-box attacks on input-transform defenses, after Athalye, Carlini & Wagner,
"Obfuscated Gradients Give a False Sense of Security" (ICML 2018).

A defense that transforms its input at inference can hide the gradient in two ways: by
randomness (a single gradient is a noisy sample of the useful one) and by a transform
without a useful gradient (quantisation, JPEG: zero or undefined almost everywhere).
``eot`` answers the first with Expectation over Transformation, ``bpda`` the second with
Backward Pass Differentiable Approximation. Both wrap a registered iterative attack
(``inner``) and change only the gradients it sees, so the loss, ε, step and iterations are
the inner attack's.
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from reidbench.attack import Attack, build_attack
from reidbench.defense import DefendedModel
from reidbench.errors import ReIDBenchError
from reidbench.registry import ATTACKS

from .iterative import IterativeMetricAttack


class _AdaptiveAttack(Attack):
    """Runs the inner iterative attack on a view of the model chosen by :meth:`adapt`.

    ``eot_samples`` gradients are averaged per step when the model's input transform is
    stochastic (``DefendedModel.stochastic``); with a deterministic transform every sample
    would give the same gradient, so a single one is taken. A model that is not a
    :class:`DefendedModel`, or has no transform, is attacked by the inner attack as is.
    """

    #: what the wrapper does, recorded by describe() since it depends on the model attacked
    rule = ""
    strengthenable = True  # handed on to the inner attack

    def __init__(self, eps, step, iterations, seed=0, inner: str = "m-ifgsm", eot_samples: int = 10):
        if not issubclass(ATTACKS.get(inner), IterativeMetricAttack):
            raise ReIDBenchError(f"attack '{self.registry_name}': inner attack '{inner}' is not an iterative "
                                 "gradient attack")
        if int(eot_samples) < 1:
            raise ReIDBenchError(f"attack '{self.registry_name}': eot_samples must be >= 1, got {eot_samples}")
        super().__init__(eps, step, iterations, seed, inner=inner, eot_samples=int(eot_samples))
        self.take_traits_of(ATTACKS.get(inner))  # the wrapper changes gradients, not what is attacked

    def describe(self) -> dict:
        return {**super().describe(), "rule": self.rule}

    def adapt(self, model: DefendedModel) -> nn.Module:
        """The module whose gradients the inner attack follows (same forward as ``model``)."""
        raise NotImplementedError

    def inner_attack(self, eot_samples: int = 1) -> Attack:
        return build_attack(self.params["inner"], eps=self.eps, step=self.step, iterations=self.iterations,
                            seed=self.seed, eot_samples=eot_samples, restarts=self.restarts,
                            best_iterate=self.best_iterate)

    def perturb(self, model, queries, ctx):
        defended = isinstance(model, DefendedModel) and model.transform is not None
        samples = self.params["eot_samples"] if defended and model.stochastic else 1
        return self.inner_attack(samples)(self.adapt(model) if defended else model, queries, ctx)


@ATTACKS.register("eot")
class EOT(_AdaptiveAttack):
    """Expectation over Transformation (Athalye et al., ICML 2018, §4.2; Athalye et al.,
    "Synthesizing Robust Adversarial Examples", ICML 2018): each step of the inner attack
    follows the mean gradient over ``eot_samples`` draws of a stochastic input transform
    (default 10, a compromise: the variance of the averaged gradient falls as 1/samples
    while the cost grows linearly with them). The gradient goes through the real transform, so a
    non-differentiable one also needs ``bpda``. Without a stochastic transform this is the
    inner attack unchanged.
    """

    rule = "inner attack with eot_samples draws per step if the input transform is stochastic, else unchanged"

    def adapt(self, model):
        return model


@ATTACKS.register("bpda")
class BPDAAttack(_AdaptiveAttack):
    """Backward Pass Differentiable Approximation (Athalye et al., ICML 2018, §4.1): when the
    defense declares its transform non-differentiable (``Defense.differentiable = False``),
    the inner attack sees ``model ∘ BPDA(transform, defense.bpda_surrogate())``: the real
    transform forward, the surrogate's gradient (identity when None) backward. A stochastic
    transform is also averaged over ``eot_samples`` draws (the paper's BPDA + EOT, §4.3).
    A differentiable transform keeps its exact gradient, and without a transform this is
    the inner attack unchanged.
    """

    rule = ("inner attack through BPDA(transform, bpda_surrogate) if the transform is non-differentiable, "
            "with eot_samples draws per step if it is stochastic; else unchanged")

    def adapt(self, model):
        if model.defense.differentiable:
            return model
        return model.with_bpda()


@ATTACKS.register("oblivious")
class Oblivious(_AdaptiveAttack):
    """The non-adaptive reference point: an attacker oblivious of the defense (Carlini &
    Wagner, "Adversarial examples are not easily detected", AISec 2017, §3: the "zero-
    knowledge" adversary). The inner attack runs entirely on the network *without* the
    defense's input transform: its gradients, and its guides too -- the clean query and
    gallery features it aims at or away from are the bare network's (``ctx.bare``, which the
    runner fills because ``needs`` lists "bare"), not the defended pipeline's, which an
    attacker unaware of the transform could not compute. Its queries are then evaluated
    through the transform, as every cell is. Comparing it with the protocol's white-box cell
    (which differentiates through the transform, with EOT / BPDA where needed) shows how much
    of a transform's robustness is only obscurity. Its threat model is "oblivious", so it
    never enters the white-box worst case. Not part of the v1 grid; run it with
    ``--attack oblivious``.
    """

    threat_model = "oblivious"
    needs = ("bare",)
    rule = "inner attack on the network without the defense's input transform, with that network's guides"

    def perturb(self, model, queries, ctx):
        if not (isinstance(model, DefendedModel) and model.transform is not None):
            return self.inner_attack()(model, queries, ctx)  # nothing to be oblivious of
        if ctx.bare is None:
            raise ReIDBenchError("attack 'oblivious' needs the bare network's clean features in its context (ctx.bare)")
        bare_ctx = dataclasses.replace(ctx, query_feats=ctx.bare.query_feats, gallery_feats=ctx.bare.gallery_feats,
                                       bare=None)
        return self.inner_attack()(model.model, queries, bare_ctx)
