"""Query-based black-box attack that sees only the ranking the system returns.

The attacker sends images to a :class:`reidbench.attack.RankOracle` and gets back the
indices of the top-k gallery images, which it maps to identities and cameras with the
gallery's ``pids`` / ``camids`` (known to the attacker, as in every ReID attack that
targets a query's true matches). It never sees features, distances or gradients.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from reidbench.attack import Attack, AttackContext
from reidbench.errors import ReIDBenchError
from reidbench.registry import ATTACKS


def reciprocal_rank_loss(rankings: torch.Tensor, owners: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
    """Σ 1/(r+1) over the true matches among the returned gallery indices, r their 0-based
    rank; one value per row of ``rankings`` (N, k), row i belonging to query ``owners[i]``.

    Ranks are counted as the Market-1501 protocol counts them (Zheng et al., ICCV 2015):
    gallery images of the query's identity *and* camera, and pid -1 junk, are skipped, and
    only cross-camera images of the identity are matches. The loss is 0 exactly when no
    true match is left in the returned top-k, and every swap of a match with a non-match
    changes it, so it is as fine-grained as a ranking allows (AP weighs the same events).
    """
    pids, cams = ctx.gallery_pids[rankings], ctx.gallery_camids[rankings]
    q_pids, q_cams = ctx.query_pids[owners].view(-1, 1), ctx.query_camids[owners].view(-1, 1)
    junk = ((pids == q_pids) & (cams == q_cams)) | (pids == -1)
    match = (pids == q_pids) & (cams != q_cams)
    rank = (~junk).long().cumsum(1) - 1  # -1 only on junk before the first valid entry
    return (match.float() / (rank + 1).clamp_min(1).float()).sum(1)


@ATTACKS.register("rank-query")
class RankQuerySignHunter(Attack):
    """SignHunter (Al-Dujaili & O'Reilly, "Sign Bits Are All You Need for Black-Box
    Attacks", ICLR 2020) on the ranking loss :func:`reciprocal_rank_loss`, to be minimised.

    **Estimator.** The perturbation is ``ε·s`` with a sign vector ``s ∈ {±1}^n``
    (n = C·H·W): under an L∞ budget the steepest step of a linearised loss is
    ``ε·sign(∇)``, so only the gradient's signs are estimated (the ε-ball's vertices).
    Following the paper's hierarchical schedule, level ``h`` splits the flattened image
    into ``2^h`` contiguous blocks and visits them in order; each visit flips the block's
    signs and keeps the flip iff the loss decreases (strictly), otherwise reverts it.
    After the last block of a level the next, finer level starts; after blocks of length
    1 the schedule restarts at ``h = 0``. As in the paper the search starts from
    ``s = +1`` (a uniform brightness shift), so the attack is deterministic and draws
    nothing from ``ctx.generator``. Starting from
    random signs instead lowered mAP clearly less on the tiny baseline when this attack was
    written (a one-off comparison, not kept as a benchmark), presumably because block flips of
    random signs remain high-frequency noise while flips of a constant start build blocky,
    low-frequency patterns. Ties are rejected, as in the paper (accepting them made no
    visible difference in that comparison).

    **Batching.** All queries of a batch move in lockstep through the same schedule, so
    each step is one oracle call carrying one candidate per still-active query; the runner
    passes every query as one batch (:attr:`~reidbench.attack.Attack.whole_query_set`), which
    changes no query's trajectory, only how many share a forward pass. A query
    stops (and stops spending) once no true match is left in the returned top-k: its loss
    is 0 and cannot decrease further.

    **Budget accounting.** One oracle image is one query charged to its owner: 1 for the
    initial point plus 1 per step. The attack plans for ``min(max_queries, oracle budget
    minus what the oracle already charged)`` queries per image, so it can never raise
    :class:`BudgetExceeded`. ``top_k`` (default: everything the oracle returns) truncates
    the ranking the loss looks at, to study how much of the ranking the attack needs.

    ``eps`` comes from the protocol; ``step`` and ``iterations`` are not used: the step
    is always a sign flip between ±ε and the number of steps is set by the query budget.
    """

    threat_model = "query-based"
    needs = ("oracle",)
    whole_query_set = True  # deterministic, and every query follows the same block schedule

    def __init__(self, eps, step, iterations, seed=0, max_queries: Optional[int] = None,
                 top_k: Optional[int] = None):
        for name, value in (("max_queries", max_queries), ("top_k", top_k)):
            if value is not None and int(value) < 1:
                raise ReIDBenchError(f"attack 'rank-query': {name} must be >= 1, got {value}")
        super().__init__(eps, step, iterations, seed, max_queries=max_queries, top_k=top_k)

    def perturb(self, model, queries: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        oracle = ctx.oracle
        if oracle is None:
            raise ReIDBenchError("attack 'rank-query' needs a rank oracle in its context")
        x0 = queries.detach()
        batch, n = len(x0), x0[0].numel()
        budget = oracle.budget - int(oracle.used[:batch].max())
        if self.params["max_queries"] is not None:
            budget = min(budget, int(self.params["max_queries"]))
        if budget < 1:
            return x0
        top_k = oracle.top_k if self.params["top_k"] is None else min(int(self.params["top_k"]), oracle.top_k)

        def loss(index: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
            clean = x0[index]
            images = (clean + self.eps * signs.view_as(clean)).clamp(0, 1)
            return reciprocal_rank_loss(oracle(images, owners=index)[:, :top_k], index, ctx)

        signs = torch.ones(batch, n, device=x0.device)
        everyone = torch.arange(batch)
        best = loss(everyone, signs)
        level, block = 0, 0
        for step in range(budget - 1):
            if ctx.report is not None and step % 25 == 0:
                ctx.report(step / budget)
            active = everyone[best > 0]
            if len(active) == 0:
                break
            length = math.ceil(n / 2 ** level)
            trial = signs[active].clone()
            trial[:, block * length:(block + 1) * length] *= -1
            trial_loss = loss(active, trial)
            better = trial_loss < best[active]
            signs[active[better]] = trial[better]
            best[active[better]] = trial_loss[better]
            block += 1
            if block * length >= n:  # level done: halve the blocks, or restart once they are single pixels
                level, block = (0 if length == 1 else level + 1), 0
        return (x0 + self.eps * signs.view_as(x0)).clamp(0, 1)
