"""The undefended baseline: standard training, no input transform."""

from reidbench.defense import Defense
from reidbench.registry import DEFENSES


@DEFENSES.register("none")
class NoDefense(Defense):
    """Cross-entropy with label smoothing + batch-hard triplet, nothing else."""

    # The standard loss takes a video model's tracklet features as it takes image features.
    data_kinds = ("image", "video")
