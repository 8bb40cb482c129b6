"""The split of one feed-forward block (FFN) into shared units and one private block per group.

An FFN is ``fc2(act(fc1(x)))`` with ``fc1: d -> H`` and ``fc2: H -> d``. Its H hidden units are
independent of each other: unit h owns row h of fc1 (and bias h) and column h of fc2. The split
keeps ``S = round(r * H)`` units shared by every language group and gives each of the G groups a
private block of ``P = H - S`` units. A token goes through the S shared units and the P units of
its own group, so its compute is that of the unsplit FFN; the parameters grow by ``(G - 1) * P``
units.

Initialisation from the unsplit (stage-1) FFN, function-preserving:

1. score every unit (``unit_scores``), by
   - ``energy``: the root-mean-square size of the unit's contribution to the FFN output,
     ``sqrt(E[act_h^2]) * ||fc2[:, h]||`` when activation statistics are given, otherwise
     ``||fc1[h, :]|| * ||fc2[:, h]||`` (the fc1 row norm standing in for the activation scale);
     ranking by it is ranking by the unit's output energy ``E[act_h^2] * ||fc2[:, h]||^2``;
   - ``svd``: the energy of the unit inside the dominant output subspace: with
     ``M = fc2 @ diag(a)`` (``a`` the activation scale above) and ``M = U diag(s) V^T``, the
     score of unit h is ``sum_{j < k} s_j^2 V[h, j]^2`` over the top k singular directions that
     hold ``svd_energy`` (default 90%) of ``||M||_F^2``;
   - ``random``: a seeded random ranking (an ablation);
2. the S best units become shared;
3. every group's private block is a copy of the remaining ``H - S`` units (fc1 rows and biases,
   fc2 columns). fc2's bias is shared.

Before any update, for every group, the split FFN therefore holds exactly the unsplit FFN's H
units, only in another order (``unit_order`` maps them back), and computes the same function.

Pure torch: no fairseq import here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

INIT_METHODS = ("energy", "svd", "random")


def n_shared_units(hidden: int, shared_ratio: float) -> int:
    """S = round(r * H), clipped to [0, H]."""
    if not 0.0 <= float(shared_ratio) <= 1.0:
        raise ValueError(f"shared ratio must lie in [0, 1], got {shared_ratio}")
    return int(min(hidden, max(0, round(float(shared_ratio) * hidden))))


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).cpu()
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def _activation_scale(fc1_weight: torch.Tensor, act_energy) -> torch.Tensor:
    """Per-unit activation scale: sqrt(E[act^2]) when given, else the fc1 row norm."""
    if act_energy is None:
        return fc1_weight.norm(dim=1)
    e = _as_tensor(act_energy).flatten()
    if e.numel() != fc1_weight.shape[0]:
        raise ValueError(f"activation energy has {e.numel()} entries for {fc1_weight.shape[0]} units")
    if (e < 0).any():
        raise ValueError("activation energy E[act^2] must be non-negative")
    return e.sqrt()


def unit_scores(
    fc1_weight,
    fc2_weight,
    method: str = "energy",
    act_energy=None,
    svd_energy: float = 0.9,
    seed: int = 0,
) -> np.ndarray:
    """Importance score of every hidden unit (higher = more important = kept shared).

    fc1_weight: (H, d); fc2_weight: (d, H); act_energy: optional (H,) mean E[act_h^2].
    """
    w1, w2 = _as_tensor(fc1_weight), _as_tensor(fc2_weight)
    if w1.dim() != 2 or w2.dim() != 2 or w1.shape[0] != w2.shape[1]:
        raise ValueError(f"fc1 (H, d) and fc2 (d, H) shapes do not match: {tuple(w1.shape)}, {tuple(w2.shape)}")
    hidden = w1.shape[0]
    if method == "random":
        rng = np.random.default_rng(seed)
        return rng.permutation(hidden).astype(np.float64)
    scale = _activation_scale(w1, act_energy)
    if method == "energy":
        return (scale * w2.norm(dim=0)).numpy()
    if method == "svd":
        if not 0.0 < svd_energy <= 1.0:
            raise ValueError(f"svd_energy must lie in (0, 1], got {svd_energy}")
        m = w2 * scale.unsqueeze(0)  # (d, H): column h = the unit's output direction, scaled
        _, s, vh = torch.linalg.svd(m, full_matrices=False)
        energy = s.pow(2)
        total = energy.sum()
        if total <= 0:
            return np.zeros(hidden)
        cum = torch.cumsum(energy, 0) / total
        k = int(torch.searchsorted(cum, torch.tensor([svd_energy], dtype=cum.dtype)).item()) + 1
        k = min(k, s.numel())
        # energy of unit h in the top-k directions: sum_j s_j^2 V[h, j]^2
        return (vh[:k].pow(2) * energy[:k].unsqueeze(1)).sum(0).numpy()
    raise ValueError(f"unknown init method {method!r}; choose from {INIT_METHODS}")


def choose_shared_units(scores, n_shared: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the shared units (the n_shared best scores) and of the others, each ascending.

    Ties are broken by the lower index, so the choice is deterministic.
    """
    scores = np.asarray(scores, dtype=np.float64)
    hidden = scores.shape[0]
    if not 0 <= n_shared <= hidden:
        raise ValueError(f"n_shared={n_shared} outside [0, {hidden}]")
    order = np.lexsort((np.arange(hidden), -scores))  # best first, ties -> lower index first
    shared = np.sort(order[:n_shared])
    private = np.sort(order[n_shared:])
    return shared.astype(np.int64), private.astype(np.int64)


@dataclass
class SplitWeights:
    """The parameters of a partitioned FFN (see ``PartitionedFFN``), as tensors.

    unit_order[j] is the index, in the unsplit FFN, of the j-th unit of the concatenation
    [shared units, private units of a group].
    """

    fc1_shared_weight: torch.Tensor  # (S, d)
    fc1_shared_bias: torch.Tensor  # (S,)
    fc1_private_weight: torch.Tensor  # (G, P, d)
    fc1_private_bias: torch.Tensor  # (G, P)
    fc2_shared_weight: torch.Tensor  # (d, S)
    fc2_private_weight: torch.Tensor  # (G, d, P)
    fc2_bias: torch.Tensor  # (d,)
    unit_order: torch.Tensor  # (H,) long

    @property
    def n_shared(self) -> int:
        return self.fc1_shared_weight.shape[0]

    @property
    def n_private(self) -> int:
        return self.fc1_private_weight.shape[1]

    @property
    def n_groups(self) -> int:
        return self.fc1_private_weight.shape[0]


def split_ffn_weights(
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    n_groups: int,
    shared_ratio: float,
    method: str = "energy",
    act_energy=None,
    svd_energy: float = 0.9,
    seed: int = 0,
    shared_units: Optional[Sequence[int]] = None,
) -> SplitWeights:
    """Function-preserving split of an unsplit FFN's weights into shared + per-group private units.

    ``shared_units`` overrides the scoring with an explicit choice of shared unit indices.
    Missing biases are taken as zero. Returned tensors are fresh copies (dtype of fc1_weight).
    """
    if n_groups < 1:
        raise ValueError(f"need at least one group, got {n_groups}")
    w1 = fc1_weight.detach()
    w2 = fc2_weight.detach()
    hidden, d = w1.shape
    if tuple(w2.shape) != (d, hidden):
        raise ValueError(f"fc2 weight shape {tuple(w2.shape)} does not match fc1 {tuple(w1.shape)}")
    b1 = fc1_bias.detach() if fc1_bias is not None else w1.new_zeros(hidden)
    b2 = fc2_bias.detach() if fc2_bias is not None else w1.new_zeros(d)
    if shared_units is not None:
        shared = np.unique(np.asarray(shared_units, dtype=np.int64))
        if shared.size and (shared.min() < 0 or shared.max() >= hidden):
            raise ValueError("shared unit index out of range")
        private = np.setdiff1d(np.arange(hidden), shared)
    else:
        n_shared = n_shared_units(hidden, shared_ratio)
        scores = unit_scores(w1, w2, method=method, act_energy=act_energy, svd_energy=svd_energy, seed=seed)
        shared, private = choose_shared_units(scores, n_shared)
    s_idx = torch.as_tensor(shared, dtype=torch.long, device=w1.device)
    p_idx = torch.as_tensor(private, dtype=torch.long, device=w1.device)
    g = n_groups
    return SplitWeights(
        fc1_shared_weight=w1.index_select(0, s_idx).clone(),
        fc1_shared_bias=b1.index_select(0, s_idx).clone(),
        fc1_private_weight=w1.index_select(0, p_idx).unsqueeze(0).repeat(g, 1, 1),
        fc1_private_bias=b1.index_select(0, p_idx).unsqueeze(0).repeat(g, 1),
        fc2_shared_weight=w2.index_select(1, s_idx).clone(),
        fc2_private_weight=w2.index_select(1, p_idx).unsqueeze(0).repeat(g, 1, 1),
        fc2_bias=b2.clone(),
        unit_order=torch.cat([s_idx, p_idx]).cpu(),
    )


def dense_group_weights(w: SplitWeights, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold one group back into an unsplit FFN of width H, units in the original (stage-1) order.

    Returns (fc1_weight (H, d), fc1_bias (H,), fc2_weight (d, H), fc2_bias (d,)).
    """
    if not 0 <= group < w.n_groups:
        raise IndexError(f"group {group} outside [0, {w.n_groups})")
    order = w.unit_order.to(w.fc1_shared_weight.device)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    w1 = torch.cat([w.fc1_shared_weight, w.fc1_private_weight[group]], 0).index_select(0, inv)
    b1 = torch.cat([w.fc1_shared_bias, w.fc1_private_bias[group]], 0).index_select(0, inv)
    w2 = torch.cat([w.fc2_shared_weight, w.fc2_private_weight[group]], 1).index_select(1, inv)
    return w1, b1, w2, w.fc2_bias.clone()
