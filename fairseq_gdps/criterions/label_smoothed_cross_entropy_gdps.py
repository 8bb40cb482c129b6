"""Criterion ``label_smoothed_cross_entropy_gdps``: fairseq's label-smoothed cross entropy under
the name the recipes and existing command lines use, kept for compatibility.

It adds nothing to the stock loss: the GDPS gradient probe and its ``--gdps-*`` flags belong to
the ``speech_to_text_gdps`` task (``tasks/gradient_probe.py``), which probes with the stock
``label_smoothed_cross_entropy`` as well.
"""
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)


@register_criterion("label_smoothed_cross_entropy_gdps", dataclass=LabelSmoothedCrossEntropyCriterionConfig)
class LabelSmoothedCrossEntropyGDPSCriterion(LabelSmoothedCrossEntropyCriterion):
    """The stock label-smoothed cross entropy (its class name is what checkpoints record)."""
