"""Transfer attack: craft on a surrogate model, evaluate on the target."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Optional

from reidbench.attack import Attack, build_attack
from reidbench.errors import ReIDBenchError
from reidbench.registry import ATTACKS


@ATTACKS.register("transfer")
class TransferAttack(Attack):
    """A white-box attack run on the attacker's own model, its images sent to the target
    (Papernot et al., "Transferability in Machine Learning: from Phenomena to Black-Box
    Attacks using Adversarial Samples", 2016).

    ``inner`` names the registered white-box attack; by default ``m-mifgsm`` when it is
    registered (momentum stabilises the update direction, which makes examples transfer
    better: Dong et al., "Boosting Adversarial Attacks with Momentum", CVPR 2018), else
    ``m-ifgsm``. The inner attack runs on ``ctx.surrogate.model`` with a context whose clean
    query and gallery features are the surrogate's own, so its guides live in the
    surrogate's feature space; identities, cameras, the generator and a training view are
    shared (``needs`` adds the inner attack's own needs); the rank oracle, which would
    reach the target, is withheld. The target model passed to :meth:`perturb` is never
    called.

    ``surrogate`` optionally names the zoo entry the runner must supply; a context with
    another one is refused. :meth:`describe` records the inner attack's full description
    and the surrogate's id (the configured one, or once the attack has run, the one the
    runner supplied).
    """

    threat_model = "transfer"
    needs = ("surrogate",)
    strengthenable = True  # handed on to the inner attack, which ranks on the surrogate

    def __init__(self, eps, step, iterations, seed=0, inner: Optional[str] = None, surrogate: Optional[str] = None):
        inner = self.inner_name(inner)
        super().__init__(eps, step, iterations, seed, inner=inner, surrogate=surrogate)
        self.inner = build_attack(inner, eps=eps, step=step, iterations=iterations, seed=seed)
        if self.inner.threat_model != "white-box":
            raise ReIDBenchError(f"attack 'transfer': inner attack '{inner}' is not a white-box attack")
        self.needs = self.needs_for(inner=inner)
        self.take_traits_of(self.inner)
        self.surrogate_id = surrogate

    @staticmethod
    def inner_name(inner: Optional[str]) -> str:
        """``inner``, or the default the class describes (which depends on what is registered)."""
        if inner is not None:
            return inner
        return "m-mifgsm" if "m-mifgsm" in ATTACKS else "m-ifgsm"

    @classmethod
    def needs_for(cls, inner: Optional[str] = None, **params) -> tuple[str, ...]:
        # The inner attack's needs are met on the surrogate's side (its training split, say).
        inner_needs = ATTACKS.get(cls.inner_name(inner)).needs_for()
        return cls.needs + tuple(need for need in inner_needs if need not in cls.needs)

    def describe(self) -> dict:
        return {**super().describe(), "inner": self.inner.describe(), "surrogate": self.surrogate_id}

    def strengthen(self, restarts: int = 1, best_iterate: bool = False) -> "TransferAttack":
        super().strengthen(restarts, best_iterate)
        self.inner.strengthen(restarts, best_iterate)
        return self

    def perturb(self, model, queries, ctx):
        view = ctx.surrogate
        if view is None:
            raise ReIDBenchError("attack 'transfer' needs a surrogate model in its context")
        if self.params["surrogate"] not in (None, view.entry_id):
            raise ReIDBenchError(f"attack 'transfer' is configured for surrogate '{self.params['surrogate']}' "
                                 f"but was given '{view.entry_id}'")
        self.surrogate_id = view.entry_id
        # The target is never called, so the result depends only on what goes into this key.
        key = hashlib.sha256(json.dumps(
            {"attack": self.describe(), "seed": ctx.generator.initial_seed() if ctx.generator is not None else None},
            sort_keys=True, default=str).encode())
        for tensor in (queries, ctx.query_pids, view.query_feats):
            key.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        key = key.hexdigest()
        if key not in view.crafted:
            inner_ctx = dataclasses.replace(ctx, query_feats=view.query_feats, gallery_feats=view.gallery_feats,
                                            surrogate=None, oracle=None, extra={})
            view.crafted[key] = self.inner(view.model, queries, inner_ctx).detach().cpu()
        return view.crafted[key].to(queries.device)
