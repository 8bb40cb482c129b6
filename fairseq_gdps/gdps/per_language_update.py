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
linear in the step's gradient.

The buffer holds every tracked gradient element per row in float64, so its size is 2U rows x
the tracked parameters x 8 bytes (tens of GB for a few languages and a large encoder). An update
of one micro-batch on one worker, whose sums are complete as soon as its backward pass ends,
skips it: ``record_blockwise`` records such an update block by block straight from the capture,
forming each block's Gram matrix and language rows from the shares in their own dtype (the same
numbers up to float32 rounding). This file imports no fairseq.
"""
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from fairseq_gdps.gdps.gradient_capture import product_dtype


class PerLanguageUpdate:
    """Per-language gradient sums and target-token counts ``(L,)`` of one update.

    The buffer is laid out block by block, so that every block's sums are one contiguous
    ``(L, d)`` matrix (``blocks[name]``) that the statistics read without copying. The buffer is
    meant to be reused from one probed update to the next (:meth:`reset`): allocating it afresh
    costs every page of it again.

    Args:
        block_sizes: block name -> number of gradient elements, in a fixed order (the same on
            every worker).
        num_languages: L, the number of language ids.
        device: where the sums live (the gradients' device; CUDA for NCCL).
    """

    def __init__(self, block_sizes: Mapping[str, int], num_languages: int, device=None):
        self.block_sizes = {name: int(size) for name, size in block_sizes.items()}
        self.num_languages = L = int(num_languages)
        total = sum(self.block_sizes.values())
        # block matrices and tokens are views of one buffer: a single all_reduce completes all
        self.buffer = torch.zeros(L * total + L, dtype=torch.float64, device=device)
        self.blocks: Dict[str, Tensor] = {}
        offset = 0
        for name, size in self.block_sizes.items():
            self.blocks[name] = self.buffer[offset: offset + L * size].view(L, size)
            offset += L * size
        self.tokens = self.buffer[offset:]

    def reset(self) -> None:
        """Zero the sums and counts for the next update (the buffer is kept)."""
        self.buffer.zero_()

    def add(self, grads: Mapping[int, Mapping[str, Tensor]], tokens: Tensor, loss_scale: float = 1.0) -> None:
        """Add one micro-batch: ``grads[lang_id][block]`` is the block's gradient summed over
        that language's utterances (any shape, any floating dtype: it is added in float64),
        ``tokens`` the ``(L,)`` target-token counts. ``loss_scale``: the factor the loss was
        multiplied by before the backward pass (mixed precision); the gradients are divided by it.
        The same as :meth:`add_gradients` (possibly a few blocks at a time) then :meth:`add_tokens`."""
        self.add_gradients(grads, loss_scale)
        self.add_tokens(tokens)

    def add_gradients(self, grads: Mapping[int, Mapping[str, Tensor]], loss_scale: float = 1.0) -> None:
        """Add gradient sums of some blocks of the micro-batch in progress (see :meth:`add`)."""
        if not loss_scale > 0:
            raise ValueError(f"loss_scale must be positive, got {loss_scale}")
        for lang, blocks in grads.items():
            for name, grad in blocks.items():
                self.blocks[name][int(lang)].add_(grad.detach().reshape(-1).to(self.buffer.device),
                                                  alpha=1.0 / loss_scale)

    def add_tokens(self, tokens: Tensor) -> None:
        """Add the micro-batch's ``(L,)`` target-token counts."""
        self.tokens += tokens.to(self.buffer)

    def per_token_halves(self) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Every row's token count ``(L,)`` and ``{block: (L, d) gradient per target token}``
        with a zero row where a row has no tokens: what ``GradientStatistics.add_probe`` takes
        (rows are probe halves there). Divides the buffer in place: :meth:`reset` before reuse."""
        divisor = self.tokens.clamp(min=1.0)[:, None]   # a row without tokens has a zero sum
        return self.tokens.clone(), {name: block.div_(divisor) for name, block in self.blocks.items()}


def record_blockwise(statistics, step: int, capture, tokens: Tensor, block_sizes: Mapping[str, int],
                     loss_scale: float = 1.0, batch_key: Optional[int] = None) -> List[str]:
    """Record one probed update of ONE micro-batch on ONE worker straight from its capture
    (``PerLanguageGradients``, shares completed), block by block, without a ``PerLanguageUpdate``.
    Returns the languages skipped for non-finite gradients.

    Why: the buffer holds 2U rows x every tracked gradient element in float64 (tens of GB for a
    large encoder), while neither a block's Gram matrix nor its languages' rows need the other
    blocks; so each block is recorded and its shares freed before the next one. A block's
    quantities are formed from the capture's shares directly, part by part (each layer's weight
    and bias), with no float64 copy of the 2U rows:

    * its Gram matrix (``capture.block_gram``, formed during the backward pass by a capture that
      keeps no shares): the sum over parts of ``part @ part.T`` in the shares' dtype (float32 or
      float64; half-precision shares are promoted to float32), accumulated in float64, divided by
      ``loss_scale^2 x tokens_r x tokens_s`` (tokens clamped at 1, as ``per_token_halves``);
    * its languages' per-token rows (the summed statistics, when kept): ``mix @ part`` with each
      half's weight ``tokens_r / tokens_language / (loss_scale x tokens_r)`` folded into the
      mixing matrix, in the shares' dtype, stored in float64.

    The buffer path (``--update-freq`` > 1 or data-parallel workers, whose sums must be complete
    before any Gram matrix is formed) computes the same quantities from float64 rows: the two
    agree to float32 rounding, not bit for bit.

    ``tokens``: (2U,) target tokens per row; ``block_sizes``: the blocks to record, in the
    statistics' module order."""
    if not loss_scale > 0:
        raise ValueError(f"loss_scale must be positive, got {loss_scale}")
    tokens = tokens.to(torch.float64)
    probe = statistics.begin_probe(step, tokens.cpu(), batch_key)
    R = len(tokens)
    captured = torch.tensor([int(row) for row in capture.languages], dtype=torch.int64)  # rows with utterances
    scale = 1.0 / (loss_scale * tokens.cpu().clamp(min=1.0))          # (R,) row r = share_r x scale_r
    gram_scale = scale[captured, None] * scale[None, captured]
    # the languages' rows go to the summed statistics only: none to form without them
    mix = (probe.mix[:, captured] * scale[None, captured]) if statistics.summed and probe.mix.numel() else None
    for name, size in block_sizes.items():
        if capture.block_size(name) != size:
            raise ValueError(f"{name}: the capture has {capture.block_size(name)} gradient elements, expected {size}")
        gram = capture.block_gram(name)
        lang_rows = None
        if mix is not None:
            parts = capture.block_parts(name)
            device = parts[0].device
            dtype = product_dtype(parts[0].dtype)
            lang_rows = probe.language_rows(name, device)
            mix_d = mix.to(device=device, dtype=dtype)
            offset = 0
            for part in parts:
                lang_rows[:, offset: offset + part.size(1)].copy_(mix_d @ part.to(dtype))
                offset += part.size(1)
            del parts
        capture.release([name])
        full = torch.zeros(R, R, dtype=torch.float64)
        full[captured[:, None], captured[None, :]] = gram.cpu() * gram_scale
        probe.add_block_terms(name, full, lang_rows)
    return probe.finish()
