"""Evaluation metrics: distances, CMC / mAP / mINP, their intervals, and k-reciprocal re-ranking."""

from .bootstrap import IdentityBootstrap, metric_intervals, rank1_variance_interval
from .distance import pairwise_distance
from .fairness import identity_spread, per_identity_rank1
from .rank import RankResult, evaluate_rank
from .rerank import k_reciprocal_rerank

__all__ = ["IdentityBootstrap", "metric_intervals", "rank1_variance_interval", "pairwise_distance", "identity_spread", "per_identity_rank1", "evaluate_rank", "RankResult", "k_reciprocal_rerank"]
