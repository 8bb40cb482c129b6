"""Translation scoring for ``gdps-score``: sacrebleu metrics and paired bootstrap
(``translation_scores``), COMET from a local model (``comet_scores``).

Kept apart from ``fairseq_gdps.gdps`` (the GDPS statistics, analysis and split): scoring a
decode does not depend on how the model was trained.
"""
