"""fairseq-gdps: load with ``fairseq-train --user-dir fairseq_gdps``.

Importing the package registers the task, criterion and models with fairseq.
"""
import os

# fairseq 0.12 checkpoints hold pickled objects; torch >= 2.6 refuses them under its
# weights-only default, which breaks resume and fairseq-generate.
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

from fairseq_gdps import criterions, models, tasks  # noqa: E402,F401  (registration)
