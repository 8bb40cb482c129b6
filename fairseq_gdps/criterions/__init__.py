from fairseq_gdps.criterions import label_smoothed_cross_entropy_gdps  # noqa: F401
