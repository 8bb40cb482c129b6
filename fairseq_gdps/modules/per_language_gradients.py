"""Per-language weight gradients of chosen Linear layers, taken from one ordinary backward pass.

A Linear layer's weight gradient is a sum over positions of ``grad_output^T @ input``. Utterances
do not interact in a speech-to-text forward pass, so restricting that sum to the batch columns of
one language gives exactly that language's share of the gradient, and the shares add up to the
gradient the backward pass computes anyway. This replaces one backward per single-language
sub-batch: fairseq's convolutional subsampler lets the zero frames past an utterance's end (i.e.
the batch's padding) into its encoding, so separate sub-batches would not reproduce the stock
update exactly, and they would cost more.

The share of the language with the most utterances in the batch is not multiplied out: it is the
layer's gradient (read from a hook on the parameter) minus the other languages' shares. That
saves the largest of the per-language products, which is what the probe costs on top of the
stock backward (``benchmarks/speed.py`` measures it). Done in float32/float64 only; under
half precision the difference would lose too many digits, so every share is multiplied out.
"""
from functools import partial
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

_SUBTRACT_DTYPES = (torch.float32, torch.float64)


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
        # the language (index into self.languages) whose share is the layer's gradient minus the others'
        self.derived = max(range(len(self.languages)), key=lambda i: self.columns[i].numel())
        self._handles = []
        self._weight: Dict[tuple, Tensor] = {}  # (L, out, in) shares; rows of derived layers filled later
        self._bias: Dict[tuple, Tensor] = {}
        self._total: Dict[tuple, Dict[str, Tensor]] = {}  # parameter gradients of the derived layers
        self._derived_keys = set()
        self._no_gradient_layers = set()  # (block, k) whose output needed no gradient in the forward

    @staticmethod
    def _parameters(layer: nn.Linear) -> Dict[str, Tensor]:
        return {"weight": layer.weight, **({"bias": layer.bias} if layer.bias is not None else {})}

    def __enter__(self):
        for name, layers in self.blocks.items():
            for k, layer in enumerate(layers):
                key = (name, k)
                self._handles.append(layer.register_forward_hook(partial(self._on_forward, key)))
                params = self._parameters(layer)
                if all(p.requires_grad and p.dtype in _SUBTRACT_DTYPES for p in params.values()):
                    self._derived_keys.add(key)
                    for kind, p in params.items():
                        self._handles.append(p.register_hook(partial(self._on_param_grad, key, kind)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return False

    def _on_param_grad(self, key, kind, grad):
        totals = self._total.setdefault(key, {})
        totals[kind] = totals[kind] + grad if kind in totals else grad
        return None

    def _on_forward(self, key, module, inputs, output):
        if not output.requires_grad:   # the layer and everything below it are frozen
            self._no_gradient_layers.add(key)
            return
        x = inputs[0].detach()
        if x.dim() != 3 or x.size(1) != self.lang_ids.numel():
            raise ValueError(
                f"{key[0]}: expected time-major input (T, B={self.lang_ids.numel()}, C), got {tuple(x.shape)}"
            )
        output.register_hook(partial(self._on_grad, key, x, module.bias is not None))

    def _on_grad(self, key, x, has_bias, grad_output):
        skip = self.derived if key in self._derived_keys else None
        n, out_dim, in_dim = len(self.languages), grad_output.size(-1), x.size(-1)
        # every row but the derived one is overwritten below: zeroing them all would cost a pass
        # over L shares per layer; the derived row is zero until _shares forms it
        weight = grad_output.new_empty(n, out_dim, in_dim)
        bias = grad_output.new_empty(n, out_dim) if has_bias else None
        if skip is not None:
            weight[skip].zero_()
            if has_bias:
                bias[skip].zero_()
        for i, cols in enumerate(self.columns):
            if i == skip:
                continue
            g = grad_output.index_select(1, cols).reshape(-1, out_dim)
            torch.mm(g.t(), x.index_select(1, cols).reshape(-1, in_dim), out=weight[i])
            if has_bias:
                torch.sum(g, 0, out=bias[i])
        self._weight[key] = self._weight[key] + weight if key in self._weight else weight
        if has_bias:
            self._bias[key] = self._bias[key] + bias if key in self._bias else bias
        return None

    def complete(self) -> None:
        """Form every derived share now, from the parameter gradients of this backward pass, and
        drop the references to those gradients. Call it right after the backward pass when the
        shares are read later (e.g. after the optimizer step): the trainer scales, clips and
        zeroes ``.grad`` in place, and a parameter's gradient may be that very tensor."""
        for key in list(self._weight):
            if key in self._derived_keys:
                for kind, store in (("weight", self._weight), ("bias", self._bias)):
                    if key in store:
                        self._shares(key, kind)
        self._derived_keys, self._total = set(), {}

    def _shares(self, key, kind: str) -> Tensor:
        """(L, ...) per-language shares of one layer's weight or bias."""
        shares = (self._weight if kind == "weight" else self._bias)[key]
        if key in self._derived_keys:
            total = self._total.get(key, {}).get(kind)
            if total is None:
                raise RuntimeError(f"{key[0]}: layer {key[1]}'s {kind} got no gradient in this backward pass")
            shares[self.derived] = 0
            shares[self.derived] = total - shares.sum(0)
        return shares

    def blocks_without_gradient(self) -> List[str]:
        """Blocks with a layer whose output needed no gradient in the forward pass (the layer and
        everything below it frozen): they have no per-language gradient to record."""
        return [name for name in self.blocks if any(key[0] == name for key in self._no_gradient_layers)]

    def block_parts(self, name: str) -> List[Tensor]:
        """The per-language shares of block ``name`` as the ``(L, n_k)`` parts of its flattened
        gradient, in order (each layer's weight, then its bias; row i: ``self.languages[i]``):
        views of the capture, so that a reader can place them where it wants them without first
        concatenating them into a copy. A block of :meth:`blocks_without_gradient` is an error."""
        parts = []
        for k, layer in enumerate(self.blocks[name]):
            if (name, k) not in self._weight:
                why = " (its output needed none: it and everything below it are frozen)" \
                    if (name, k) in self._no_gradient_layers else ""
                raise RuntimeError(f"{name}: layer {k} got no gradient in this backward pass{why}")
            parts.append(self._shares((name, k), "weight").flatten(1))
            if layer.bias is not None:
                parts.append(self._shares((name, k), "bias"))
        return parts

    def gradients(self, names: Optional[Iterable[str]] = None) -> Dict[int, Dict[str, Tensor]]:
        """Per-language gradients of the blocks ``names`` (default: every block; see the class
        docstring); a block of :meth:`blocks_without_gradient` is an error."""
        out: Dict[int, Dict[str, Tensor]] = {lang: {} for lang in self.languages}
        for name in (self.blocks if names is None else names):
            flat = torch.cat(self.block_parts(name), dim=1)
            for i, lang in enumerate(self.languages):
                out[lang][name] = flat[i]
        return out

    def release(self, names: Iterable[str]) -> None:
        """Drop the per-language shares of the blocks ``names`` (read them with :meth:`gradients`
        first): a probe that records block by block frees each block's shares once recorded, so
        that they and the block's float64 rows are not all held at once."""
        for name in names:
            for k in range(len(self.blocks[name])):
                for store in (self._weight, self._bias, self._total):
                    store.pop((name, k), None)
