"""Per-language weight gradients of chosen Linear layers, taken from one ordinary backward pass.

A Linear layer's weight gradient is a sum over positions of ``grad_output^T @ input``. Utterances
do not interact in a speech-to-text forward pass, so restricting that sum to the batch columns of
one language gives exactly that language's share of the gradient, and the shares add up to the
gradient the backward pass computes anyway. This replaces one backward per single-language
sub-batch: fairseq's convolutional subsampler lets the zero frames past an utterance's end (i.e.
the batch's padding) into its encoding, so separate sub-batches would not reproduce the stock
update exactly, and they would cost more.
"""
from functools import partial
from typing import Dict, Mapping, Sequence

import torch
from torch import Tensor, nn


class PerLanguageGradients:
    """Context manager: while active, records per-language gradients of ``blocks``' Linear layers.

    Args:
        blocks: block name -> its Linear layers (e.g. ``(fc1, fc2)``); each layer must see
            time-major input ``(T, B, C)``, as fairseq's transformer and conformer layers do.
        lang_ids: ``(B,)`` language id of every utterance of the batch.

    After the backward pass, :meth:`gradients` gives ``{lang_id: {block: flat gradient}}`` with
    each block's parameters flattened in ``[*layer.parameters()]`` order (weight, then bias).
    """

    def __init__(self, blocks: Mapping[str, Sequence[nn.Linear]], lang_ids: Tensor):
        self.blocks = {name: tuple(layers) for name, layers in blocks.items()}
        self.lang_ids = lang_ids
        self.languages = torch.unique(lang_ids).tolist()
        self.columns = [torch.nonzero(lang_ids == lang).squeeze(1) for lang in self.languages]
        self._handles = []
        self._weight: Dict[tuple, Tensor] = {}
        self._bias: Dict[tuple, Tensor] = {}

    def __enter__(self):
        for name, layers in self.blocks.items():
            for k, layer in enumerate(layers):
                self._handles.append(layer.register_forward_hook(partial(self._on_forward, (name, k))))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return False

    def _on_forward(self, key, module, inputs, output):
        if not output.requires_grad:
            return
        x = inputs[0].detach()
        if x.dim() != 3 or x.size(1) != self.lang_ids.numel():
            raise ValueError(
                f"{key[0]}: expected time-major input (T, B={self.lang_ids.numel()}, C), got {tuple(x.shape)}"
            )
        output.register_hook(partial(self._on_grad, key, x, module.bias is not None))

    def _on_grad(self, key, x, has_bias, grad_output):
        weights, biases = [], []
        for cols in self.columns:
            g = grad_output.index_select(1, cols).reshape(-1, grad_output.size(-1))
            weights.append(g.t() @ x.index_select(1, cols).reshape(-1, x.size(-1)))
            if has_bias:
                biases.append(g.sum(0))
        weight = torch.stack(weights)
        self._weight[key] = self._weight[key] + weight if key in self._weight else weight
        if has_bias:
            bias = torch.stack(biases)
            self._bias[key] = self._bias[key] + bias if key in self._bias else bias
        return None

    def gradients(self) -> Dict[int, Dict[str, Tensor]]:
        out: Dict[int, Dict[str, Tensor]] = {lang: {} for lang in self.languages}
        for name, layers in self.blocks.items():
            parts = []
            for k, layer in enumerate(layers):
                if (name, k) not in self._weight:
                    raise RuntimeError(f"{name}: layer {k} got no gradient in this backward pass")
                parts.append(self._weight[(name, k)].flatten(1))
                if layer.bias is not None:
                    parts.append(self._bias[(name, k)])
            flat = torch.cat(parts, dim=1)
            for i, lang in enumerate(self.languages):
                out[lang][name] = flat[i]
        return out
