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
the tracked parameters x 8 bytes (26 GB for 4 languages and an encoder of SeamlessM4T-Medium's
shape). An update of one micro-batch on one worker, whose sums are complete as soon as its
backward pass ends, skips it: ``record_blockwise`` records such an update block by block straight
from the capture, one block's rows in memory at a time (same numbers, bit for bit). This file
imports no fairseq.
"""
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor


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
        self.block_names = list(block_sizes)
        self.block_sizes = {name: int(block_sizes[name]) for name in self.block_names}
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
        self.micro_batches = 0

    def reset(self) -> None:
        """Zero the sums and counts for the next update (the buffer is kept)."""
        self.buffer.zero_()
        self.micro_batches = 0

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
        """Add the micro-batch's ``(L,)`` target-token counts; completes the micro-batch."""
        self.tokens += tokens.to(self.buffer)
        self.micro_batches += 1

    def _present(self) -> List[int]:
        return torch.nonzero(self.tokens > 0).flatten().tolist()

    def per_token(self, languages: Sequence[str]) -> Dict[str, Dict[str, Tensor]]:
        """``{language: {block: gradient per target token}}`` for the languages with tokens in
        the update (float64, new tensors; the sums are left as they are)."""
        self._check_names(languages)
        return {languages[lang]: {name: self.blocks[name][lang] / self.tokens[lang] for name in self.block_names}
                for lang in self._present()}

    def per_token_rows(self, languages: Sequence[str]) -> Tuple[List[str], Dict[str, Tensor]]:
        """The languages with tokens in the update and ``{block: (n, d) gradients per target
        token}``, a row per such language: what ``GradientStatistics.add_step_rows`` takes.

        Works in place, without allocating: the present languages' rows are moved to
        the top of every block matrix and divided there, so the update is spent afterwards
        (:meth:`reset` it before reuse). Element for element the same numbers as :meth:`per_token`."""
        self._check_names(languages)
        present = self._present()
        n = len(present)
        if n < self.num_languages:
            # row present[i] >= i: moving the rows in increasing order never overwrites one still to move
            for i, lang in enumerate(present):
                if lang != i:
                    for block in self.blocks.values():
                        block[i].copy_(block[lang])
                    self.tokens[i] = self.tokens[lang]
        divisor = self.tokens[:n, None]
        per_token = {name: block[:n].div_(divisor) for name, block in self.blocks.items()}
        return [languages[lang] for lang in present], per_token

    def per_token_halves(self) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Every row's token count ``(L,)`` and ``{block: (L, d) gradient per target token}``
        with a zero row where a row has no tokens: what ``GradientStatistics.add_probe`` takes
        (rows are probe halves there). Divides the buffer in place: :meth:`reset` before reuse."""
        divisor = self.tokens.clamp(min=1.0)[:, None]   # a row without tokens has a zero sum
        return self.tokens.clone(), {name: block.div_(divisor) for name, block in self.blocks.items()}

    def _check_names(self, languages: Sequence[str]) -> None:
        if len(languages) != self.num_languages:
            raise ValueError(f"expected {self.num_languages} language names, got {len(languages)}")


def record_blockwise(statistics, step: int, capture, tokens: Tensor, block_sizes: Mapping[str, int],
                     loss_scale: float = 1.0, work: Optional[Tensor] = None,
                     batch_key: Optional[int] = None) -> Tuple[List[str], Tensor]:
    """Record one probed update of ONE micro-batch on ONE worker straight from its capture
    (``PerLanguageGradients``, shares completed), block by block, without a ``PerLanguageUpdate``.

    Why. The buffer holds 2U rows x every tracked gradient element in float64: for an encoder of
    SeamlessM4T-Medium's shape (48 FFN blocks of 8.4M parameters, 403M in all) and 4 languages,
    8 x 403M x 8 B = 26 GB, on top of the capture's shares (2U x 403M in the gradients' dtype).
    A block's Gram matrix needs only that block's rows, and its languages' rows go to the
    (sketched) sums at once (``GradientStatistics.begin_probe``), so here each block's (2U, d)
    float64 rows are formed, recorded and dropped, and the capture's shares of the block are
    freed, before the next block: the transient memory is one block's rows (8 x 8.4M x 8 B =
    0.5 GB at that shape) and the capture, which shrinks as blocks are recorded.

    The trade-off. Only an update whose sums are complete after one micro-batch on one worker can
    be recorded this way: with ``--update-freq`` > 1 or data-parallel workers every block's sums
    must be complete (summed over micro-batches, reduced over workers) before any Gram matrix
    is formed, which needs the buffer (kept in float64 so that sums and the all_reduce add no
    rounding; sketching before the reduction is not an option either: the Gram matrices need the
    exact rows). Those runs keep the buffer's memory. The numbers are the buffer path's, bit for
    bit: each row is the share times 1 / loss scale (rounded once, as ``add`` rounds it onto the
    buffer's zeros), then divided by the row's tokens (clamped at 1), in float64, as ``add`` and
    ``per_token_halves`` form them. (One exception, equal in value: a share element of -0.0 stays
    -0.0 here, where adding it to the buffer's zeros makes it +0.0.)

    ``tokens``: (2U,) target tokens per row; ``block_sizes``: the blocks to record, in the
    statistics' module order; ``work``: the float64 rows buffer returned by the previous call
    (reused: a fresh 2U x block buffer per block would be paid for page by page). Returns the
    languages skipped for non-finite gradients and the rows buffer (2U x the largest block)."""
    if not loss_scale > 0:
        raise ValueError(f"loss_scale must be positive, got {loss_scale}")
    tokens = tokens.to(torch.float64)
    probe = statistics.begin_probe(step, tokens.cpu(), batch_key)
    divisor = tokens.clamp(min=1.0)[:, None]
    R = len(tokens)
    captured = [int(row) for row in capture.languages]   # the rows with utterances (sorted)
    absent = torch.tensor(sorted(set(range(R)) - set(captured)), dtype=torch.int64)
    # Rows without utterances are zero. Nothing but the scaling of zeros writes them, so in the
    # reused buffer they stay zero from one block to the next of the same size (same layout).
    zeroed_size = None
    for name, size in block_sizes.items():
        parts = capture.block_parts(name)
        device = parts[0].device
        if work is None or work.device != device or work.numel() < R * max(block_sizes.values()):
            work = torch.empty(R * max(block_sizes.values()), dtype=torch.float64, device=device)
            zeroed_size = None
        rows = work[: R * size].view(R, size)
        # Each part is copied (converted to float64, exactly) to its place in the rows: one pass,
        # where zeroing the rows, adding a concatenated copy of the shares and dividing took four.
        # Multiplying by 1 / loss_scale afterwards rounds as add_(share, alpha=1 / loss_scale) onto
        # zeros does (the buffer path), and is skipped when it is 1.
        if absent.numel() and size != zeroed_size:
            rows.index_fill_(0, absent.to(device), 0.0)
            zeroed_size = size
        offset = 0
        for part in parts:
            width = part.size(1)
            if len(captured) == R:
                rows[:, offset: offset + width].copy_(part)
            else:
                for i, row in enumerate(captured):
                    rows[row, offset: offset + width].copy_(part[i])
            offset += width
        if offset != size:
            raise ValueError(f"{name}: the capture has {offset} gradient elements, expected {size}")
        del parts
        capture.release([name])
        if loss_scale != 1.0:
            rows.mul_(1.0 / loss_scale)
        probe.add_block(name, rows.div_(divisor.to(rows.device)))
    return probe.finish(), work
