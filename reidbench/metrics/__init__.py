"""Evaluation metrics: distances, CMC / mAP / mINP, and k-reciprocal re-ranking."""

from .distance import pairwise_distance
from .rank import RankResult, evaluate_rank
from .rerank import k_reciprocal_rerank

__all__ = ["pairwise_distance", "evaluate_rank", "RankResult", "k_reciprocal_rerank"]
