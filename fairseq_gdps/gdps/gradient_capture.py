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

A probe that keeps only the shares' Gram matrices (the same-state records, without the summed
statistics) reduces each layer's shares to their ``(L, L)`` Gram matrix as soon as the layer's
parameter gradients arrive (``keep_shares=False``), while the shares are still in cache, and frees
them there: cheaper than forming the derived share and the Gram matrix from shares held through
the optimizer step, and the shares' memory is not held across the layers.

Pure torch hooks (no fairseq import), used by the task's gradient probe
(``tasks/gradient_probe.py``).
"""
from functools import partial
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

_SUBTRACT_DTYPES = (torch.float32, torch.float64)


def product_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the shares' products (Gram matrices, mixed rows) are formed in: their own in
    float32/float64, float32 for half precision."""
    return dtype if dtype in _SUBTRACT_DTYPES else torch.float32


class PerLanguageGradients:
    """Context manager: while active, records per-language gradients of ``blocks``' Linear layers.

    Args:
        blocks: block name -> its Linear layers (e.g. ``(fc1, fc2)``); each layer must see
            time-major input ``(T, B, C)``, as fairseq's transformer and conformer layers do.
        lang_ids: ``(B,)`` language id of every utterance of the batch.

        keep_shares: keep every layer's per-language shares until they are read (:meth:`gradients`,
            :meth:`block_parts`); ``False``: keep only their Gram matrices (:meth:`block_gram`),
            formed layer by layer during the backward pass.

    After the backward pass, :meth:`gradients` gives ``{lang_id: {block: flat gradient}}`` with
    each block's parameters flattened in ``[*layer.parameters()]`` order (weight, then bias), and
    :meth:`block_gram` the ``(L, L)`` Gram matrix of those gradients.
    """

    def __init__(self, blocks: Mapping[str, Sequence[nn.Linear]], lang_ids: Tensor, keep_shares: bool = True):
        self.blocks = {name: tuple(layers) for name, layers in blocks.items()}
        self.keep_shares = bool(keep_shares)
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
        self._gram: Dict[tuple, Tensor] = {}  # (L, L) float64 Gram matrix of a layer's shares (keep_shares=False)
        self._param_count: Dict[tuple, int] = {}  # parameters of a derived layer (hooks to wait for)

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
                    self._param_count[key] = len(params)
                    for kind, p in params.items():
                        self._handles.append(p.register_hook(partial(self._on_param_grad, key, kind)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return False

    def _on_param_grad(self, key, kind, grad):
        self._check_not_reduced(key)
        totals = self._total.setdefault(key, {})
        totals[kind] = totals[kind] + grad if kind in totals else grad
        # autograd calls a parameter's hook once per backward pass, with its whole gradient, after
        # every use of the layer has had its output gradient: the layer's shares are complete
        if not self.keep_shares and key in self._weight and len(totals) == self._param_count[key]:
            self._reduce(key)
        return None

    def _check_not_reduced(self, key) -> None:
        if key in self._gram:
            raise RuntimeError(f"{key[0]}: layer {key[1]} got a gradient after its shares were reduced to their "
                               "Gram matrix (a second backward pass through one capture needs keep_shares=True)")

    def _layer_gram(self, key) -> Tensor:
        """(L, L) float64 Gram matrix of one layer's shares (weight and bias together), formed in
        the shares' dtype (half precision promoted to float32)."""
        gram = None
        for kind, store in (("weight", self._weight), ("bias", self._bias)):
            if key in store:
                part = self._shares(key, kind).flatten(1)
                part = part.to(product_dtype(part.dtype))
                term = (part @ part.T).to(torch.float64)
                gram = term if gram is None else gram + term
        return gram

    def _reduce(self, key) -> None:
        self._gram[key] = self._layer_gram(key)
        for store in (self._weight, self._bias, self._total):
            store.pop(key, None)

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
        self._check_not_reduced(key)
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
            if not self.keep_shares:   # layers without a derived share (half precision), or not yet reduced
                self._reduce(key)
            elif key in self._derived_keys:
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
            derived = shares[self.derived]
            derived.zero_()
            torch.sub(total, shares.sum(0), out=derived)
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
        if not self.keep_shares:
            raise RuntimeError(f"{name}: this capture keeps the Gram matrices of the shares only "
                               "(keep_shares=False); read block_gram")
        parts = []
        for k, layer in enumerate(self.blocks[name]):
            self._check_captured(name, k)
            parts.append(self._shares((name, k), "weight").flatten(1))
            if layer.bias is not None:
                parts.append(self._shares((name, k), "bias"))
        return parts

    def _check_captured(self, name: str, k: int) -> None:
        if (name, k) not in self._weight and (name, k) not in self._gram:
            why = " (its output needed none: it and everything below it are frozen)" \
                if (name, k) in self._no_gradient_layers else ""
            raise RuntimeError(f"{name}: layer {k} got no gradient in this backward pass{why}")

    def block_size(self, name: str) -> int:
        """Number of gradient elements of block ``name`` (its layers' parameters)."""
        return sum(p.numel() for layer in self.blocks[name] for p in self._parameters(layer).values())

    def block_gram(self, name: str) -> Tensor:
        """The ``(L, L)`` float64 Gram matrix of block ``name``'s per-language shares (row i:
        ``self.languages[i]``): the sum over its layers' weights and biases of the shares' inner
        products, each formed in the shares' dtype. A block of :meth:`blocks_without_gradient` is
        an error."""
        gram = None
        for k in range(len(self.blocks[name])):
            self._check_captured(name, k)
            term = self._gram[(name, k)] if (name, k) in self._gram else self._layer_gram((name, k))
            gram = term if gram is None else gram + term
        return gram

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
                for store in (self._weight, self._bias, self._total, self._gram):
                    store.pop((name, k), None)
