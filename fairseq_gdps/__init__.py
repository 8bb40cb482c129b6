"""fairseq-gdps: load with ``fairseq-train --user-dir fairseq_gdps``.

Importing the package registers the task, criterion and models with fairseq.
"""
import argparse
import collections
import logging
import typing


class _WithoutTensorboardXHint(logging.Filter):
    """fairseq's text-to-speech task, imported with every fairseq task, asks at import for
    tensorboardX, which none of this plugin's commands uses."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "tensorboardX" not in record.getMessage()


# before anything imports fairseq's tasks (fairseq-train itself has imported them before loading
# a --user-dir, so there the hint stays)
logging.getLogger("fairseq.tasks.text_to_speech").addFilter(_WithoutTensorboardXHint())

import fairseq.distributed.utils  # noqa: E402
import omegaconf  # noqa: E402
import torch  # noqa: E402

# torch >= 2.6 loads weights-only by default and refuses what fairseq 0.12 itself pickles: the
# model's argparse.Namespace in every checkpoint (resume, fairseq-generate, the plugin's tools), and
# the configuration as an OmegaConf container and its tensors' placeholders when rank 0 broadcasts a
# loaded checkpoint to the other data-parallel workers. Allowing these plain-data classes, and no
# others, keeps weights-only loading on for everything else in the process.
torch.serialization.add_safe_globals([
    argparse.Namespace,
    omegaconf.DictConfig, omegaconf.ListConfig, omegaconf.base.ContainerMetadata, omegaconf.base.Metadata,
    omegaconf.nodes.AnyNode, typing.Any, collections.defaultdict, dict, list, int,
    fairseq.distributed.utils._TensorPlaceholder,
])

from fairseq_gdps import criterions, models, tasks  # noqa: E402,F401  (registration)
