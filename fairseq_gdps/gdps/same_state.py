"""Same-state gradient similarity: every term of a similarity taken at the same parameters.

Why. A cosine built from sums over training steps compares terms taken at different model
states: its cross-language term contains products of two languages' gradients at one update, its
self term only products across updates. While the model trains, the expected gradient moves, the
cross term carries that movement and the self term does not, and the "cosine" can exceed 1.

What a probe records. At a probed update the batch's utterances of each *probe unit* (a language,
or a (language, speaker) pair) are split into two halves. For each tracked block only the exact
inner products of the halves' per-target-token gradients are kept: the Gram matrix ``K = Y Y^T``
(2U x 2U) and the halves' token counts, a few kilobytes per probe, so resampling probes is exact.

Estimator. Per probe, ``self_u = <y_{u,a}, y_{u,b}>`` (disjoint utterances at one state: expectation
``||mu_u||^2``) and ``cross_uv = <ybar_u, ybar_v>`` (``ybar``: the token-weighted mean of the halves);
over probes, ``rho_uv = sum_p w_p cross_uv,p / sqrt(sum_p w_p self_u,p * sum_p w_p self_v,p)``. By
Cauchy-Schwarz at every probe the expected numerator never exceeds the expected denominator, so
beyond +-1 is sampling noise only. ``w_p`` (one over the probe's mean squared half norm) makes
every probe weigh the same. Probes are bootstrapped by batch of utterances, the same draws for
every block and pair; (language, speaker) units aggregate exactly to languages (``aggregate_units``).

This file imports no fairseq.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

KIND = "gdps-same-state-probes"


@contextlib.contextmanager
def nan_quiet():
    """NaN-aware reductions over pairs or units without data (NaN there by design) stay quiet."""
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


class SameStateRecords:
    """Per-probe half-gradient Gram matrices of every tracked block (see the module docstring).

    Args:
        units: probe unit names, e.g. ``["ar", "et"]`` or ``["ar@ar_s01", "ar@ar_s02", ...]``.
        unit_languages: the language of every unit (the unit itself for language units).
        blocks: block names, in the order of the Gram matrices' second axis.
    """

    def __init__(self, units: Sequence[str], unit_languages: Sequence[str], blocks: Sequence[str]):
        if len(units) != len(unit_languages):
            raise ValueError(f"{len(units)} units but {len(unit_languages)} unit languages")
        if len(set(units)) != len(units):
            raise ValueError(f"probe units must be distinct: {list(units)}")
        if not blocks:
            raise ValueError("SameStateRecords needs at least one block")
        self.units = [str(u) for u in units]
        self.unit_languages = [str(l) for l in unit_languages]
        self.blocks = [str(b) for b in blocks]
        self._updates: List[int] = []
        self._tokens: List[torch.Tensor] = []   # (2U,) per probe
        self._grams: List[torch.Tensor] = []    # (M, 2U, 2U) per probe
        self._keys: List[int] = []              # the probe's batch (utterances) key

    @property
    def num_probes(self) -> int:
        return len(self._updates)

    @property
    def languages(self) -> List[str]:
        """The units' languages, in order of first appearance."""
        return list(dict.fromkeys(self.unit_languages))

    def add(self, update: int, tokens: torch.Tensor, grams: torch.Tensor, batch_key: Optional[int] = None) -> None:
        """Record one probe: ``tokens`` (2U,) target tokens per half, ``grams`` (M, 2U, 2U);
        ``batch_key`` identifies its batch of utterances (default: the update, a batch of its own)."""
        R = 2 * len(self.units)
        tokens = torch.as_tensor(tokens).detach().to("cpu", torch.float64).reshape(-1)
        grams = torch.as_tensor(grams).detach().to("cpu", torch.float64)
        if tokens.numel() != R or tuple(grams.shape) != (len(self.blocks), R, R):
            raise ValueError(f"probe at update {update}: expected tokens ({R},) and grams "
                             f"({len(self.blocks)}, {R}, {R}), got {tuple(tokens.shape)} and {tuple(grams.shape)}")
        self._updates.append(int(update))
        self._tokens.append(tokens)
        self._grams.append(grams)
        self._keys.append(int(update) if batch_key is None else int(batch_key))

    def arrays(self, start: Optional[int] = None, end: Optional[int] = None,
               blocks: Optional[Sequence[str]] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(updates (P,), tokens (P, 2U), grams (P, M', 2U, 2U)) of the probes with
        ``start <= update < end`` (either bound optional), for ``blocks`` (default: all)."""
        keep = [i for i, u in enumerate(self._updates)
                if (start is None or u >= start) and (end is None or u < end)]
        R = 2 * len(self.units)
        sel = [self.blocks.index(b) for b in blocks] if blocks is not None else list(range(len(self.blocks)))
        if not keep:
            return np.zeros(0, np.int64), np.zeros((0, R)), np.zeros((0, len(sel), R, R))
        updates = np.array([self._updates[i] for i in keep], dtype=np.int64)
        tokens = torch.stack([self._tokens[i] for i in keep]).numpy()
        grams = torch.stack([self._grams[i] for i in keep])[:, sel].numpy()
        return updates, tokens, grams

    def probes_per_language(self) -> Dict[str, int]:
        """How many probes had target tokens of each language (of any of its units' halves)."""
        counts = dict.fromkeys(self.languages, 0)
        for tokens in self._tokens:
            present = tokens.view(-1, 2).sum(1) > 0
            for lang in {self.unit_languages[u] for u in torch.nonzero(present).flatten().tolist()}:
                counts[lang] += 1
        return counts

    def batch_keys(self, start: Optional[int] = None, end: Optional[int] = None) -> np.ndarray:
        """(P,) batch keys of the probes of ``arrays(start, end)``."""
        return np.array([k for u, k in zip(self._updates, self._keys)
                         if (start is None or u >= start) and (end is None or u < end)], dtype=np.int64)

    def settings(self) -> dict:
        return {"units": list(self.units), "unit_languages": list(self.unit_languages), "blocks": list(self.blocks)}

    def merge_(self, other: "SameStateRecords") -> "SameStateRecords":
        """Add ``other``'s probes (e.g. of a resumed run); probes stay ordered by update."""
        if other.settings() != self.settings():
            raise ValueError("cannot merge same-state probes of other units or blocks "
                             f"(theirs: {other.units} / {other.blocks}; ours: {self.units} / {self.blocks})")
        entries = sorted(zip(self._updates + other._updates, self._tokens + other._tokens,
                             self._grams + other._grams, self._keys + other._keys), key=lambda e: e[0])
        self._updates = [e[0] for e in entries]
        self._tokens = [e[1] for e in entries]
        self._grams = [e[2] for e in entries]
        self._keys = [e[3] for e in entries]
        return self

    def state_dict(self) -> dict:
        R, M = 2 * len(self.units), len(self.blocks)
        return {"kind": KIND, **self.settings(),
                "updates": torch.tensor(self._updates, dtype=torch.int64),
                "batch_keys": torch.tensor(self._keys, dtype=torch.int64),
                "tokens": torch.stack(self._tokens) if self._tokens else torch.zeros(0, R, dtype=torch.float64),
                "grams": torch.stack(self._grams) if self._grams else torch.zeros(0, M, R, R, dtype=torch.float64)}

    @classmethod
    def from_state_dict(cls, d: dict, source: str = "state dict") -> "SameStateRecords":
        if not isinstance(d, dict) or d.get("kind") != KIND:
            raise ValueError(f"{source}: not same-state probe records")
        try:
            rec = cls(d["units"], d["unit_languages"], d["blocks"])
            updates, tokens, grams = d["updates"], d["tokens"], d["grams"]
            keys = d["batch_keys"].tolist() if "batch_keys" in d else updates.tolist()
            if not (len(updates) == len(tokens) == len(grams) == len(keys)):
                raise ValueError("updates, batch keys, tokens and grams differ in length")
            for u, t, g, k in zip(updates.tolist(), tokens, grams, keys):
                rec.add(u, t, g, k)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{source}: malformed same-state probe records ({exc})") from None
        return rec

    def nbytes(self) -> int:
        """Bytes of the recorded probes (grows by ``8 * (2U + M (2U)^2 + 2)`` per probe)."""
        return sum(t.numel() * 8 + g.numel() * 8 + 16 for t, g in zip(self._tokens, self._grams))


# ------------------------------------------------------------------------ estimation
def aggregate_units(tokens: np.ndarray, grams: np.ndarray, unit_group: Sequence[int],
                    num_groups: int) -> Tuple[np.ndarray, np.ndarray]:
    """Gram matrices of coarser units (e.g. languages from (language, speaker) units).

    ``tokens`` (P, 2U), ``grams`` (P, M, 2U, 2U); ``unit_group[u]`` the coarse unit of u. A coarse
    half is the token-weighted mean of its members' same halves. Returns (tokens (P, 2G),
    grams (P, M, 2G, 2G))."""
    tokens = np.asarray(tokens, dtype=np.float64)
    grams = np.asarray(grams, dtype=np.float64)
    P, R = tokens.shape
    U = R // 2
    member = np.zeros((2 * num_groups, R))
    for u, g in enumerate(unit_group):
        member[2 * g, 2 * u] = member[2 * g + 1, 2 * u + 1] = 1.0
    coarse_tokens = tokens @ member.T                                   # (P, 2G)
    with np.errstate(invalid="ignore", divide="ignore"):
        A = member[None] * tokens[:, None, :] / coarse_tokens[:, :, None]   # (P, 2G, 2U)
    A = np.nan_to_num(A, nan=0.0, posinf=0.0, neginf=0.0)
    out = np.einsum("pgr,pmrs,phs->pmgh", A, grams, A, optimize=True)
    assert U == len(unit_group)
    return coarse_tokens, out


def probe_terms(tokens: np.ndarray, grams: np.ndarray):
    """Per-probe terms of every block: (self (P, M, U), cross (P, M, U, U), both (P, U), weight (P, M)).

    ``both[p, u]``: unit u had utterances in both halves at probe p (its terms are defined)."""
    tokens = np.asarray(tokens, dtype=np.float64)
    grams = np.asarray(grams, dtype=np.float64)
    P, R = tokens.shape
    U = R // 2
    ta, tb = tokens[:, 0::2], tokens[:, 1::2]                           # (P, U)
    both = (ta > 0) & (tb > 0)
    self_ = grams[:, :, 0::2, 1::2][..., np.arange(U), np.arange(U)]    # (P, M, U): <y_a, y_b>
    with np.errstate(invalid="ignore", divide="ignore"):
        wa = np.where(both, ta / (ta + tb), 0.0)
    wb = np.where(both, 1.0 - wa, 0.0)
    # ybar_u = wa y_a + wb y_b  ->  <ybar_u, ybar_v> from the four half blocks
    Kaa, Kab = grams[:, :, 0::2, 0::2], grams[:, :, 0::2, 1::2]
    Kba, Kbb = grams[:, :, 1::2, 0::2], grams[:, :, 1::2, 1::2]
    A, B = wa[:, None, :, None], wb[:, None, :, None]
    A2, B2 = wa[:, None, None, :], wb[:, None, None, :]
    cross = A * A2 * Kaa + A * B2 * Kab + B * A2 * Kba + B * B2 * Kbb
    diag = np.einsum("pmrr->pmr", grams)                                # squared norms of the halves
    present = (tokens > 0)[:, None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = (diag * present).sum(-1) / present.sum(-1)
        weight = np.where(scale > 0, 1.0 / scale, 0.0)
    return self_, cross, both, weight


def ratio_of_sums(self_: np.ndarray, cross: np.ndarray, both: np.ndarray, weight: np.ndarray,
                  counts: Optional[np.ndarray] = None):
    """rho (M, U, U) -- or (R, M, U, U) with bootstrap ``counts`` (R, P) -- and the number of
    probes behind every pair (U, U). Diagonal: 1 where the unit has a positive self term."""
    P, M, U = self_.shape
    pair = (both[:, :, None] & both[:, None, :]).astype(np.float64)     # (P, U, U)
    W = np.ones((1, P)) if counts is None else np.asarray(counts, dtype=np.float64)
    wpair = weight[:, :, None, None] * pair[:, None]                    # (P, M, U, U)
    num = np.einsum("rp,pmuv->rmuv", W, wpair * cross, optimize=True)
    den_u = np.einsum("rp,pmuv->rmuv", W, wpair * self_[:, :, :, None], optimize=True)
    den_v = np.einsum("rp,pmuv->rmuv", W, wpair * self_[:, :, None, :], optimize=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = num / np.sqrt(den_u * den_v)
    rho = np.where((den_u > 0) & (den_v > 0), rho, np.nan)
    idx = np.arange(U)
    own = np.einsum("rp,pmu->rmu", W, weight[:, :, None] * both[:, None, :] * self_, optimize=True)
    rho[:, :, idx, idx] = np.where(own > 0, 1.0, np.nan)
    n_pairs = pair.sum(0)
    return (rho[0] if counts is None else rho), n_pairs


def self_cosine(tokens: np.ndarray, grams: np.ndarray) -> np.ndarray:
    """Mean over probes of ``<y_a, y_b> / (||y_a|| ||y_b||)`` per block and unit (M, U): how much
    of one half-batch's gradient is signal (NaN where a unit never had both halves)."""
    grams = np.asarray(grams, dtype=np.float64)
    P, M, R, _ = grams.shape
    U = R // 2
    ab = grams[:, :, 0::2, 1::2][..., np.arange(U), np.arange(U)]
    aa = grams[:, :, 0::2, 0::2][..., np.arange(U), np.arange(U)]
    bb = grams[:, :, 1::2, 1::2][..., np.arange(U), np.arange(U)]
    both = (np.asarray(tokens)[:, 0::2] > 0) & (np.asarray(tokens)[:, 1::2] > 0)
    with nan_quiet():   # a unit never with both halves: NaN
        c = np.where(both[:, None, :], ab / np.sqrt(aa * bb), np.nan)
        return np.nanmean(c, axis=0) if P else np.full((M, U), np.nan)


def bootstrap_counts(num_probes: int, resamples: int, seed: int = 0,
                     clusters: Optional[Sequence[int]] = None) -> np.ndarray:
    """(resamples, P) counts: probes drawn with replacement, or with ``clusters`` (a key per
    probe) whole clusters drawn with replacement, every probe counted as often as its cluster
    (probes of one batch of utterances, repeated epoch after epoch, are one draw, not several)."""
    rng = np.random.default_rng(seed)
    if num_probes == 0 or resamples <= 0:
        return np.zeros((0, num_probes))
    if clusters is None:
        return rng.multinomial(num_probes, np.full(num_probes, 1.0 / num_probes), size=int(resamples)).astype(np.float64)
    keys, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    K = len(keys)
    drawn = rng.multinomial(K, np.full(K, 1.0 / K), size=int(resamples)).astype(np.float64)   # (R, K)
    return drawn[:, inverse]


def interval(samples: np.ndarray, level: float = 0.9) -> Tuple[np.ndarray, np.ndarray]:
    """Percentile interval over the first axis (NaN-aware)."""
    lo = (1 - level) / 2
    with nan_quiet():
        return np.nanquantile(samples, lo, axis=0), np.nanquantile(samples, 1 - lo, axis=0)
