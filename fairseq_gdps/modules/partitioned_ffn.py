"""PartitionedFFN: an FFN whose hidden units are S shared units plus one private block of P units
per language group (see ``fairseq_gdps.gdps.split`` for the split and its initialisation).

A token of group g goes through ``[shared units, private block g]``: H = S + P units, the compute
of the unsplit FFN. Layout is fairseq's time-major one: x is (T, B, d), ``group_ids`` is (B,).

``forward(x, group_ids)`` is the whole block: optional pre-LayerNorm (the Conformer
``FeedForwardModule``), fc1, activation, activation dropout, fc2, output dropout. When
``group_ids`` is None, the ids set by ``set_group_ids`` (or the ``route`` context) are used: this
is how the GDPS models route through fairseq layers whose ``forward`` knows nothing of groups.

Routing: the shared units run as one dense FFN over every token; the private units run as one
dense FFN per group present in the batch, on that group's utterances (``index_select`` in,
``index_add`` out: a loop over groups, never over utterances; a batch of a single group needs no
indexing). The hidden activations of the two halves are never concatenated and no weights are
copied: concatenating the weights per group, gathering private weights per utterance, or routing
fc1 and fc2 separately as drop-in Linear replacements all measured slower.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from fairseq_gdps.gdps.split import SplitWeights, dense_group_weights
from fairseq_gdps.net_input import LANG_ID_KEY


def _dropout(p: Union[float, nn.Module]) -> nn.Module:
    return p if isinstance(p, nn.Module) else nn.Dropout(float(p))


class PartitionedFFN(nn.Module):
    """Parameters: ``fc1_shared_weight`` (S, d), ``fc1_shared_bias`` (S,), ``fc1_private_weight``
    (G, P, d), ``fc1_private_bias`` (G, P), ``fc2_shared_weight`` (d, S), ``fc2_private_weight``
    (G, d, P), ``fc2_bias`` (d,) (shared); buffer ``unit_order`` (H,).

    ``activation_fn``: a function or module (default relu); ``activation_dropout`` / ``dropout``:
    a probability or a dropout module (e.g. the fairseq layer's own ``FairseqDropout``);
    ``layer_norm``: an optional pre-norm module (e.g. the Conformer FFN's own LayerNorm).
    """

    def __init__(
        self,
        embed_dim: int,
        n_shared: int,
        n_private: int,
        n_groups: int,
        activation_fn: Optional[Union[Callable, nn.Module]] = None,
        activation_dropout: Union[float, nn.Module] = 0.0,
        dropout: Union[float, nn.Module] = 0.0,
        layer_norm: Optional[nn.Module] = None,
    ):
        super().__init__()
        if n_groups < 1 or n_shared < 0 or n_private < 0 or n_shared + n_private < 1:
            raise ValueError(f"bad partition: S={n_shared}, P={n_private}, G={n_groups}")
        d, s, p, g = embed_dim, n_shared, n_private, n_groups
        self.embed_dim, self.n_shared, self.n_private, self.n_groups = d, s, p, g
        self.layer_norm = layer_norm
        self.fc1_shared_weight = nn.Parameter(torch.empty(s, d))
        self.fc1_shared_bias = nn.Parameter(torch.zeros(s))
        self.fc1_private_weight = nn.Parameter(torch.empty(g, p, d))
        self.fc1_private_bias = nn.Parameter(torch.zeros(g, p))
        self.fc2_shared_weight = nn.Parameter(torch.empty(d, s))
        self.fc2_private_weight = nn.Parameter(torch.empty(g, d, p))
        self.fc2_bias = nn.Parameter(torch.zeros(d))
        # unit_order[j]: index in the unsplit FFN of unit j of [shared, private]; used by to_dense
        self.register_buffer("unit_order", torch.arange(s + p))
        self.activation_fn = activation_fn if activation_fn is not None else F.relu
        self.activation_dropout = _dropout(activation_dropout)
        self.dropout = _dropout(dropout)
        self._group_ids: Optional[torch.Tensor] = None
        self.reset_parameters()

    @property
    def hidden_dim(self) -> int:
        return self.n_shared + self.n_private

    def reset_parameters(self):
        """Same init as an nn.Linear pair of width H (private blocks start equal across groups)."""
        d, h = self.embed_dim, self.hidden_dim
        w1 = torch.empty(h, d)
        w2 = torch.empty(d, h)
        nn.init.kaiming_uniform_(w1, a=5 ** 0.5)
        nn.init.kaiming_uniform_(w2, a=5 ** 0.5)
        b1 = torch.empty(h).uniform_(-1 / d ** 0.5, 1 / d ** 0.5)
        b2 = torch.empty(d).uniform_(-1 / h ** 0.5, 1 / h ** 0.5)
        self.load_split_weights(
            SplitWeights(
                fc1_shared_weight=w1[: self.n_shared],
                fc1_shared_bias=b1[: self.n_shared],
                fc1_private_weight=w1[self.n_shared:].expand(self.n_groups, -1, -1),
                fc1_private_bias=b1[self.n_shared:].expand(self.n_groups, -1),
                fc2_shared_weight=w2[:, : self.n_shared],
                fc2_private_weight=w2[:, self.n_shared:].expand(self.n_groups, -1, -1),
                fc2_bias=b2,
                unit_order=torch.arange(h),
            )
        )

    @classmethod
    def from_split(cls, w: SplitWeights, **kwargs) -> "PartitionedFFN":
        m = cls(w.fc1_shared_weight.shape[1], w.n_shared, w.n_private, w.n_groups, **kwargs)
        m = m.to(device=w.fc1_shared_weight.device, dtype=w.fc1_shared_weight.dtype)
        m.load_split_weights(w)
        return m

    @torch.no_grad()
    def load_split_weights(self, w: SplitWeights):
        for name in ("fc1_shared_weight", "fc1_shared_bias", "fc1_private_weight", "fc1_private_bias",
                     "fc2_shared_weight", "fc2_private_weight", "fc2_bias"):
            getattr(self, name).copy_(getattr(w, name))
        self.unit_order.copy_(w.unit_order)

    def split_weights(self) -> SplitWeights:
        return SplitWeights(
            self.fc1_shared_weight.detach(), self.fc1_shared_bias.detach(),
            self.fc1_private_weight.detach(), self.fc1_private_bias.detach(),
            self.fc2_shared_weight.detach(), self.fc2_private_weight.detach(),
            self.fc2_bias.detach(), self.unit_order,
        )

    @torch.no_grad()
    def to_dense(self, group: int):
        """Group ``group`` as an ordinary FFN of width H, units in the stage-1 order:
        (fc1_weight (H, d), fc1_bias (H,), fc2_weight (d, H), fc2_bias (d,)), fresh tensors."""
        return tuple(t.clone() for t in dense_group_weights(self.split_weights(), group))

    # ---- routing -------------------------------------------------------------------------
    def set_group_ids(self, group_ids: Optional[torch.Tensor]):
        self._group_ids = group_ids

    def _resolve(self, group_ids: Optional[torch.Tensor], batch: int) -> torch.Tensor:
        g = group_ids if group_ids is not None else self._group_ids
        if g is None:
            raise RuntimeError(
                "PartitionedFFN needs the language group of every utterance: pass group_ids, or "
                f"give the model net_input['{LANG_ID_KEY}']"
            )
        if g.dim() != 1 or g.numel() != batch:
            raise ValueError(f"group ids of shape {tuple(g.shape)} for a batch of {batch}")
        g = g.to(device=self.fc2_bias.device, dtype=torch.long)
        if g.numel() and (int(g.min()) < 0 or int(g.max()) >= self.n_groups):
            raise ValueError(f"group ids must lie in [0, {self.n_groups}), got {g.tolist()}")
        return g

    def _half(self, x, w1, b1, w2, b2):
        return F.linear(self.activation_dropout(self.activation_fn(F.linear(x, w1, b1))), w2, b2)

    def _private(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return self._half(x, self.fc1_private_weight[k], self.fc1_private_bias[k], self.fc2_private_weight[k], None)

    def forward(self, x: torch.Tensor, group_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (T, B, d); group_ids: (B,) or None for the ids set by ``set_group_ids``."""
        g = self._resolve(group_ids, x.shape[1])
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        # the shared units, for every token at once (fc2's bias is shared too)
        y = self._half(x, self.fc1_shared_weight, self.fc1_shared_bias, self.fc2_shared_weight, self.fc2_bias)
        if g.numel() > 0:
            first = g[:1]
            if bool((g == first).all()):  # one group in the batch
                y = y + self._private(x, int(first.item()))
            else:  # each group present, on its own utterances
                for k in torch.unique(g).tolist():
                    idx = torch.nonzero(g == k).squeeze(1)
                    y = y.index_add(1, idx, self._private(x.index_select(1, idx), k))
        return self.dropout(y)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, shared={self.n_shared}, private={self.n_private}, "
                f"groups={self.n_groups}")


@contextlib.contextmanager
def route(modules: Iterable[PartitionedFFN], group_ids: Optional[torch.Tensor]):
    """Set the group ids of ``modules`` for the duration of a forward pass, then clear them."""
    modules = list(modules)
    for m in modules:
        m.set_group_ids(group_ids)
    try:
        yield
    finally:
        for m in modules:
            m.set_group_ids(None)
