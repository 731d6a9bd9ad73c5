"""Shared by the attack tests: what the white-box protocol grants an attacker, and mAP."""

import torch

from reidbench.attack import AttackContext, TrainView
from reidbench.features import embed, extract_features
from reidbench.metrics import evaluate_rank, pairwise_distance


def white_box_context(model, split, index=None):
    """Clean query/gallery features and the training view, restricted to ``index`` if given."""
    size = tuple(model.input_size)
    ctx = AttackContext(
        query_pids=split.query.pids, query_camids=split.query.camids,
        query_feats=extract_features(model, split.query, size, progress=False),
        gallery_feats=extract_features(model, split.gallery, size, progress=False),
        gallery_pids=split.gallery.pids, gallery_camids=split.gallery.camids,
        train=TrainView(split.train, size),
    )
    return ctx if index is None else ctx.batch(index)


def mean_ap(model, images, ctx):
    with torch.no_grad():
        feats = embed(model, images)
    return float(evaluate_rank(pairwise_distance(feats, ctx.gallery_feats), ctx.query_pids, ctx.gallery_pids,
                               ctx.query_camids, ctx.gallery_camids).mAP)
