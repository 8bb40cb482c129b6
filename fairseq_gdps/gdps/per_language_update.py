"""One update's per-language gradients, summed over its micro-batches and data-parallel workers.

The probe records one step per update. An update may span several micro-batches
(``--update-freq``) and several data-parallel workers; its per-language gradient per target
token is

    g_l = (sum over micro-batches and workers of language l's gradient sum) /
          (sum over micro-batches and workers of language l's target tokens),

which is what a single process would measure on all of the update's utterances at once.
``PerLanguageUpdate`` keeps both sums in one float64 buffer, so that one element-wise sum of
that buffer across workers (``torch.distributed.all_reduce``) completes them; a mean of
per-worker means would weigh one worker's few tokens of a language like another's many. The
statistics themselves cannot be reduced instead: their squared norms and moments are not
linear in the step's gradient. This file imports no fairseq.
"""
from typing import Dict, Mapping, Sequence

import torch
from torch import Tensor


class PerLanguageUpdate:
    """Per-language gradient sums ``(L, D)`` and target-token counts ``(L,)`` of one update.

    Args:
        block_sizes: block name -> number of gradient elements, in a fixed order (the same on
            every worker).
        num_languages: L, the number of language ids.
        device: where the sums live (the gradients' device; CUDA for NCCL).
    """

    def __init__(self, block_sizes: Mapping[str, int], num_languages: int, device=None):
        self.block_names = list(block_sizes)
        self.slices: Dict[str, slice] = {}
        offset = 0
        for name in self.block_names:
            self.slices[name] = slice(offset, offset + int(block_sizes[name]))
            offset += int(block_sizes[name])
        self.num_languages = int(num_languages)
        # sums and tokens are views of one buffer: a single all_reduce completes both
        self.buffer = torch.zeros(self.num_languages * offset + self.num_languages, dtype=torch.float64, device=device)
        self.sums = self.buffer[: self.num_languages * offset].view(self.num_languages, offset)
        self.tokens = self.buffer[self.num_languages * offset:]
        self.micro_batches = 0

    def add(self, grads: Mapping[int, Mapping[str, Tensor]], tokens: Tensor) -> None:
        """Add one micro-batch: ``grads[lang_id][block]`` is the block's gradient summed over
        that language's utterances (any shape), ``tokens`` the ``(L,)`` target-token counts."""
        for lang, blocks in grads.items():
            for name, grad in blocks.items():
                self.sums[int(lang), self.slices[name]] += grad.detach().reshape(-1).to(self.buffer)
        self.tokens += tokens.to(self.buffer)
        self.micro_batches += 1

    def per_token(self, languages: Sequence[str]) -> Dict[str, Dict[str, Tensor]]:
        """``{language: {block: gradient per target token}}`` for the languages with tokens in
        the update (float64)."""
        if len(languages) != self.num_languages:
            raise ValueError(f"expected {self.num_languages} language names, got {len(languages)}")
        present = torch.nonzero(self.tokens > 0).flatten().tolist()
        return {languages[lang]: {name: self.sums[lang, sl] / self.tokens[lang] for name, sl in self.slices.items()}
                for lang in present}
