"""Per-language, per-module gradient statistics of the GDPS probe, kept as sums that merge by addition.

``GradientStatistics`` holds what stage 1 records for ``gdps-analyze``: the same-state probe
records (``same_state.py``: every probe's half-gradient Gram matrices, from which the decision
comes) and, optionally (``summed=True``, stage 1 with ``--gdps-summed-statistics``), the summed
statistics behind the summed-statistics diagnostic (``summed_diagnostics.py``): per (language,
module) the step count ``n``, the sum of gradients ``S``, the sum of squared norms ``Q`` (in S's
space) and ``Q_exact``, the same sums over additive step buckets, and the moments of each step's
gradient projected to ``subspace_dim`` dimensions. None of it grows with the number of steps, so
merging workers' or intervals' statistics and resuming are one operation (``merge_``).

Large modules are reduced with a seeded CountSketch (``sketch_dim`` and the bucket space,
``aux_dim``), which preserves inner products in expectation, in O(d) time and memory; the hashes
are rebuilt from the seed, never saved. This file imports no fairseq.
"""
from __future__ import annotations

import math
import os
import zlib
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from fairseq_gdps.atomic import atomic_write
from fairseq_gdps.gdps.same_state import SameStateRecords

# What a file holds is said by its fields: the same-state records (``same_state``, absent before
# version 2) and whether the summed statistics are kept (``summed``; files that lack the field keep
# them). Versions 1-3 differ from 4 in nothing this code reads: 3 marked the files without the
# summed statistics by its number, 4 by the ``summed`` field alone.
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
KIND = "gdps-gradient-statistics"

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _derived_seed(seed: int, name: str, purpose: int) -> int:
    """A seed for one (module, purpose), identical in every process (no Python hash())."""
    return _splitmix64((int(seed) & _MASK64) ^ (zlib.crc32(name.encode()) << 8) ^ purpose) & ((1 << 63) - 1)


class CountSketch:
    """Seeded CountSketch R^d -> R^k (``h: [d] -> [k]``, ``s: [d] -> {-1, +1}``)."""

    def __init__(self, d: int, k: int, seed: int):
        gen = torch.Generator().manual_seed(int(seed))
        self.d, self.k = int(d), int(k)
        self.index = torch.randint(0, self.k, (self.d,), generator=gen, dtype=torch.int64)
        self.sign = torch.randint(0, 2, (self.d,), generator=gen, dtype=torch.int64).to(torch.float64) * 2 - 1
        self._on: Dict[torch.device, tuple] = {}

    def _tensors(self, device):
        device = torch.device(device)
        if device.type == "cpu":
            return self.index, self.sign
        if device not in self._on:
            self._on[device] = (self.index.to(device), self.sign.to(device))
        return self._on[device]

    def __call__(self, x: torch.Tensor, work: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Sketch the rows of ``x`` (shape ``(..., d)``) -> ``(..., k)``, in x's dtype and device.
        ``work``: optional scratch of x's shape, dtype and device for the signed copy of x."""
        index, sign = self._tensors(x.device)
        out = torch.zeros(*x.shape[:-1], self.k, dtype=x.dtype, device=x.device)
        signed = torch.mul(x, sign.to(x.dtype), out=work) if work is not None else x * sign.to(x.dtype)
        return out.index_add_(x.dim() - 1, index, signed)


class GradientStatistics:
    """Additive per-language, per-module gradient statistics (see the module docstring).

    Args:
        module_sizes: module name -> number of gradient elements, in a fixed order.
        languages: languages known up front (others are added on first sight).
        sketch_dim: CountSketch dimension of the stored sums (None: exact, full size d).
        subspace_dim: dimension r of the per-step projection (0 disables the subspace moments).
        seed: seed of every random projection.
        model_signature: free text identifying the model (checked by ``load``).
        num_buckets: number of additive step buckets (bootstrap resampling of the summed statistics).
        aux_dim: maximum dimension of the bucket sums and of the input to the subspace projection.
        probe_units: units of the same-state probe (languages, or "language@speaker" pairs);
            None: no same-state records (``add_probe`` is then unavailable).
        probe_unit_languages: the language of every probe unit (default: the unit itself).
        summed: keep the summed statistics (everything above but the same-state records). False
            keeps the same-state records alone (and the counts of probes kept and of languages
            left out for non-finite gradients): a probe then costs its Gram matrices only, none of
            the sums, sketches and projections of its languages' gradients, and ``gdps-analyze``
            has no summed-statistics diagnostic to report. Needs ``probe_units``; ``add_step`` is
            then unavailable.
    """

    def __init__(self, module_sizes: Mapping[str, int], languages: Optional[Sequence[str]] = None,
                 sketch_dim: Optional[int] = None, subspace_dim: int = 64, seed: int = 0,
                 model_signature: str = "", num_buckets: int = 16, aux_dim: int = 4096,
                 probe_units: Optional[Sequence[str]] = None,
                 probe_unit_languages: Optional[Sequence[str]] = None, summed: bool = True):
        if not module_sizes:
            raise ValueError("GradientStatistics needs at least one module")
        if not summed and probe_units is None:
            raise ValueError("GradientStatistics without the summed statistics (summed=False) records the "
                             "same-state records alone: it needs probe_units")
        self.summed = bool(summed)
        self.module_names: List[str] = [str(m) for m in module_sizes]
        self.module_sizes: Dict[str, int] = {str(m): int(s) for m, s in module_sizes.items()}
        for m, s in self.module_sizes.items():
            if s <= 0:
                raise ValueError(f"module {m!r} has size {s}; sizes must be positive")
        if sketch_dim is not None and int(sketch_dim) <= 0:
            raise ValueError("sketch_dim must be positive or None")
        if int(subspace_dim) < 0 or int(num_buckets) <= 0 or int(aux_dim) <= 0:
            raise ValueError("subspace_dim must be >= 0, num_buckets and aux_dim > 0")
        self.sketch_dim = None if sketch_dim is None else int(sketch_dim)
        self.subspace_dim = int(subspace_dim)
        self.seed = int(seed)
        self.model_signature = str(model_signature)
        self.num_buckets = int(num_buckets)
        self.aux_dim = int(aux_dim)
        self.languages: List[str] = []
        self._lang_index: Dict[str, int] = {}
        self.device = torch.device("cpu")
        self.source = ""  # the file these statistics were read from, named in merge errors
        self._proj_cache: Dict[str, tuple] = {}
        self._scratch = torch.empty(0, dtype=torch.float64)   # add_step's temporaries, reused (not saved)
        # a probe's languages' rows per module (ProbeRecording), reused from probe to probe (not saved)
        self._probe_rows: Dict[Optional[str], torch.Tensor] = {}
        self._active_probe: Optional["ProbeRecording"] = None
        self._buffers: Dict[str, torch.Tensor] = {}
        self._alloc()
        if languages:
            self._ensure_languages(languages)
        self.same_state: Optional[SameStateRecords] = None
        if probe_units is not None:
            unit_langs = list(probe_units) if probe_unit_languages is None else list(probe_unit_languages)
            self.same_state = SameStateRecords(probe_units, unit_langs, self.module_names)
            self._ensure_languages(self.same_state.languages)

    # ------------------------------------------------------------------ layout
    def stored_dim(self, module: str) -> int:
        """Length e of the stored sums S of ``module`` (d, or sketch_dim when that is smaller)."""
        d = self.module_sizes[module]
        return d if self.sketch_dim is None or self.sketch_dim >= d else self.sketch_dim

    def bucket_dim(self, module: str) -> int:
        """Length k of the bucket sums (aux space) of ``module``."""
        return min(self.stored_dim(module), self.aux_dim)

    def _specs(self):
        """(buffer name, shape without language axes, language axes), in a fixed order."""
        M, B, r = len(self.module_names), self.num_buckets, self.subspace_dim
        specs = [("steps", (1,), ()), ("skipped", (), (0,))]
        if not self.summed:
            return specs
        specs += [("n", (M,), (0,)), ("Q", (M,), (0,)), ("Q_exact", (M,), (0,)),
                 ("bucket_n", (B, M), (1,)), ("bucket_Q", (B, M), (1,))]
        if r:
            specs.append(("pair_n", (M,), (0, 1)))
        for m in self.module_names:
            specs.append((f"S/{m}", (self.stored_dim(m),), (0,)))
            specs.append((f"bucket_S/{m}", (B, self.bucket_dim(m)), (1,)))
            if r:
                specs.append((f"first/{m}", (r,), (0, 1)))
                specs.append((f"second/{m}", (r, r), (0, 1)))
                specs.append((f"cross/{m}", (r, r), (0, 1)))
        return specs

    @staticmethod
    def _full_shape(rest, lang_axes, L):
        shape = list(rest)
        for ax in sorted(lang_axes):
            shape.insert(ax, L)
        return tuple(shape)

    def _alloc(self):
        L = len(self.languages)
        self._buffers = {name: torch.zeros(self._full_shape(rest, axes, L), dtype=torch.float64, device=self.device)
                         for name, rest, axes in self._specs()}

    def _remap_languages(self, new_languages: Sequence[str]):
        """Re-lay the buffers out for ``new_languages`` (a superset, any order); new ones are zero."""
        new_languages = list(new_languages)
        if new_languages == self.languages:
            return
        missing = set(self.languages) - set(new_languages)
        if missing:
            raise ValueError(f"cannot drop recorded languages {sorted(missing)}")
        L = len(new_languages)
        src = torch.tensor([self._lang_index.get(l, -1) for l in new_languages], dtype=torch.int64)
        have = (src >= 0).nonzero().flatten()
        for name, rest, axes in self._specs():
            old = self._buffers[name]
            new = torch.zeros(self._full_shape(rest, axes, L), dtype=torch.float64, device=self.device)
            if axes == (0, 1):
                new[have[:, None], have[None, :]] = old[src[have][:, None], src[have][None, :]]
            elif axes == (0,):
                new[have] = old[src[have]]
            elif axes == (1,):
                new[:, have] = old[:, src[have]]
            else:
                new = old.clone()
            self._buffers[name] = new
        self.languages = new_languages
        self._lang_index = {l: i for i, l in enumerate(new_languages)}

    def _ensure_languages(self, langs: Iterable[str]):
        new = [str(l) for l in langs if str(l) not in self._lang_index]
        if new:
            seen = []
            for l in new:
                if l not in seen:
                    seen.append(l)
            self._remap_languages(self.languages + seen)

    def to(self, device) -> "GradientStatistics":
        """Move the accumulators to ``device`` (gradients may live anywhere; results are moved)."""
        self.device = torch.device(device)
        self._buffers = {k: v.to(self.device) for k, v in self._buffers.items()}
        return self

    # ------------------------------------------------------------ projections
    def _projections(self, module: str):
        if module not in self._proj_cache:
            d, e, k, r = self.module_sizes[module], self.stored_dim(module), self.bucket_dim(module), self.subspace_dim
            main = CountSketch(d, e, _derived_seed(self.seed, module, 1)) if e < d else None
            aux = CountSketch(e, k, _derived_seed(self.seed, module, 2)) if k < e else None
            gauss = None
            if r:
                gen = torch.Generator().manual_seed(_derived_seed(self.seed, module, 3))
                gauss = torch.randn(r, k, generator=gen, dtype=torch.float64) / math.sqrt(r)
            self._proj_cache[module] = (main, aux, gauss, {})
        return self._proj_cache[module]

    def _gauss_on(self, module: str, device):
        _, _, gauss, on = self._projections(module)
        device = torch.device(device)
        if device.type == "cpu":
            return gauss
        if device not in on:
            on[device] = gauss.to(device)
        return on[device]

    def _work(self, shape, device) -> torch.Tensor:
        """Scratch float64 tensor of ``shape`` on ``device`` (contents undefined)."""
        numel = math.prod(shape)
        if self._scratch.device != torch.device(device) or self._scratch.numel() < numel:
            self._scratch = torch.empty(numel, dtype=torch.float64, device=device)
        return self._scratch[:numel].view(*shape)

    def _probe_rows_buffer(self, module: str, rows: int, device) -> torch.Tensor:
        """Scratch ``(rows, d)`` float64 for a probe's languages' rows of ``module``, reused from
        probe to probe: a fresh one is paid for page by page at every block (as much as the
        product that fills it). An exact module's rows are ``_prepare``'s stored-space rows, kept
        until ``_commit`` once every module is prepared, so such a module has a buffer of its own
        (as large as its sums S); a sketched module's are dropped once sketched, so those share
        one (the largest sketched module's)."""
        d = self.module_sizes[module]
        key = module if self.stored_dim(module) == d else None
        buffer = self._probe_rows.get(key)
        if buffer is None or buffer.device != torch.device(device) or buffer.numel() < rows * d:
            buffer = torch.empty(rows * d, dtype=torch.float64, device=device)
            self._probe_rows[key] = buffer
        return buffer[: rows * d].view(rows, d)

    def bucket_of(self, step: int) -> int:
        """Bucket of a step: a seeded 64-bit mix of the step number, modulo ``num_buckets``."""
        return _splitmix64((int(step) & _MASK64) ^ _splitmix64(self.seed)) % self.num_buckets

    # -------------------------------------------------------------- recording
    @torch.no_grad()
    def add_step(self, step: int, grads: Mapping[str, Mapping[str, torch.Tensor]]) -> List[str]:
        """Record one update: ``grads[lang][module]`` is the gradient of ``module`` on the
        single-language sub-batch of ``lang`` (any shape; flattened here).

        A language with any non-finite gradient is skipped for this step (all its modules),
        counted in ``skipped_nonfinite``; the others are recorded. Returns the skipped languages.
        """
        self._require_summed("add_step")
        langs = [str(l) for l in grads]
        for l in langs:
            unknown = [m for m in grads[l] if m not in self.module_sizes]
            if unknown:
                raise ValueError(f"add_step: language {l!r} has untracked modules {unknown}")
        modules = []
        for m in self.module_names:
            rows = [l for l in langs if m in grads[l]]
            if not rows:
                continue
            d = self.module_sizes[m]
            flat = []
            for l in rows:
                g = grads[l][m].detach().reshape(-1)
                if g.numel() != d:
                    raise ValueError(f"add_step: gradient of {m!r} for {l!r} has {g.numel()} elements, expected {d}")
                flat.append(g)
            modules.append((m, rows, torch.stack(flat)))
        return self._record(step, langs, modules)

    @torch.no_grad()
    def add_probe(self, step: int, tokens: torch.Tensor, rows: Mapping[str, torch.Tensor],
                  batch_key: Optional[int] = None) -> List[str]:
        """Record one probed update given per probe-unit half (see ``same_state.py``).

        ``tokens``: (2U,) target tokens of every half (row ``2u + h``: unit u, half h);
        ``rows[module]``: (2U, d) per-target-token gradient of every half (zero rows where a half
        has no tokens). Keeps the halves' Gram matrices (the same-state records) and records
        each present language's per-token gradient (its halves' token-weighted mean) as one
        step of the summed statistics (norms, buckets, subspace moments). ``batch_key``
        identifies the probe's batch (probes of one batch are resampled together; default: the
        step, i.e. every probe its own batch). Returns the languages skipped for non-finite
        gradients (a probe with any non-finite row keeps no Gram matrix).

        The same as ``begin_probe(step, tokens, batch_key)``, ``add_block`` for every module and
        ``finish`` (which records the same numbers block by block, see :class:`ProbeRecording`)."""
        probe = self.begin_probe(step, tokens, batch_key)
        missing = [m for m in self.module_names if m not in rows]
        if missing:
            raise ValueError(f"add_probe: no rows for modules {missing}")
        for m in self.module_names:
            probe.add_block(m, rows[m])
        return probe.finish()

    def begin_probe(self, step: int, tokens: torch.Tensor, batch_key: Optional[int] = None) -> "ProbeRecording":
        """Start recording a probed update block by block (see :class:`ProbeRecording`). One
        probe at a time: a probe begun earlier and not finished can no longer be finished (the
        languages' rows it had prepared live in buffers this one reuses)."""
        self._active_probe = ProbeRecording(self, step, tokens, batch_key)
        return self._active_probe

    def _prepare(self, m: str, rows: List[str], G: torch.Tensor):
        """One module's per-step quantities of ``_record``: (module index, module, its languages,
        Y (stored space), Z (aux space), X (subspace), (n, 3) squared norms). Reads nothing that
        another module's preparation writes, so modules may be prepared one at a time."""
        mi = self.module_names.index(m)
        r = self.subspace_dim
        # float64 throughout; a float64 input is used as it is (no copy)
        G = G.to(torch.float64)
        main, aux, _, _ = self._projections(m)
        # the element-wise temporaries go to one reused scratch buffer: a fresh allocation
        # of this size is paid for page by page at every step
        work = self._work(G.shape, G.device)
        q_exact = torch.mul(G, G, out=work).sum(1)
        Y = main(G, work) if main is not None else G
        q = (Y * Y).sum(1) if main is not None else q_exact
        Z = aux(Y, self._work(Y.shape, Y.device)) if aux is not None else Y
        qz = (Z * Z).sum(1) if aux is not None else q
        X = Z @ self._gauss_on(m, Z.device).T if r else None
        return (mi, m, rows, Y, Z, X, torch.stack([q_exact, q, qz], 1))

    def _record(self, step: int, langs: List[str], modules) -> List[str]:
        """Record ``modules``, a list of (module, its languages, (n, d) gradients), in module order."""
        if not langs or not modules:
            return []
        self._ensure_languages(langs)
        return self._commit(step, langs, [self._prepare(m, rows, G) for m, rows, G in modules])

    def _commit(self, step: int, langs: List[str], results) -> List[str]:
        """Add prepared modules (``_prepare``) to the sums: a language with a non-finite value in
        any module is skipped in all of them. Returns the skipped languages."""
        if not langs or not results:
            return []
        self._ensure_languages(langs)
        r = self.subspace_dim
        finite = {}
        # One device sync for the finiteness check of every (language, module).
        ok_rows = torch.cat([torch.isfinite(res[-1]).all(1) for res in results]).cpu().tolist()
        pos = 0
        for mi, m, rows, *_ in results:
            for l in rows:
                finite[l] = finite.get(l, True) and bool(ok_rows[pos])
                pos += 1
        skipped = [l for l in langs if not finite.get(l, True)]
        if skipped:
            for l in skipped:
                self._buffers["skipped"][self._lang_index[l]] += 1
        if len(skipped) == len(langs):
            return skipped
        b = self.bucket_of(step)
        buf, dev = self._buffers, self.device
        for mi, m, rows, Y, Z, X, qs in results:
            keep = [i for i, l in enumerate(rows) if finite[l]]
            if not keep:
                continue
            idx = torch.tensor([self._lang_index[rows[i]] for i in keep], dtype=torch.int64, device=dev)
            if len(keep) < len(rows):
                sel = torch.tensor(keep, dtype=torch.int64, device=Y.device)
                Y, Z, qs = Y.index_select(0, sel), Z.index_select(0, sel), qs.index_select(0, sel)
                X = X.index_select(0, sel) if r else None
            Y, Z, qs = Y.to(dev), Z.to(dev), qs.to(dev)
            buf["n"][idx, mi] += 1
            buf["Q_exact"][idx, mi] += qs[:, 0]
            buf["Q"][idx, mi] += qs[:, 1]
            buf["bucket_n"][b, idx, mi] += 1
            buf["bucket_Q"][b, idx, mi] += qs[:, 2]
            buf[f"S/{m}"].index_add_(0, idx, Y)
            buf[f"bucket_S/{m}"][b].index_add_(0, idx, Z)
            if r:
                # Only the entries of two recorded languages change (the others would add zeros):
                # [i, j] gets x_i (first), x_i x_i^T (second), x_i x_j^T (cross). The products are
                # taken once into the reused scratch and added without an (L, L, r, r) temporary
                # per sum (at 16 languages and r = 64, 8 MB per module and sum).
                X = X.to(dev)
                n = len(keep)
                outer = torch.mul(X[:, None, :, None], X[None, :, None, :], out=self._work((n, n, r, r), dev))
                buf["pair_n"][:, :, mi].index_put_((idx[:, None], idx[None, :]),
                                                   torch.ones((), dtype=torch.float64, device=dev), accumulate=True)
                _add_at(buf[f"first/{m}"], idx, X[:, None, :].expand(n, n, r))
                own = outer.diagonal(dim1=0, dim2=1).permute(2, 0, 1)   # x_i x_i^T, (n, r, r)
                _add_at(buf[f"second/{m}"], idx, own[:, None].expand(n, n, r, r))
                _add_at(buf[f"cross/{m}"], idx, outer)
        buf["steps"] += 1
        return skipped

    # ------------------------------------------------------------- accessors
    @property
    def num_steps(self) -> int:
        """Number of recorded steps (``add_step`` or probes) that kept at least one language,
        summed over merges."""
        return int(self._buffers["steps"].item())

    @property
    def skipped_nonfinite(self) -> Dict[str, int]:
        return {l: int(v) for l, v in zip(self.languages, self._buffers["skipped"].tolist())}

    def _require_summed(self, what: str) -> None:
        if not self.summed:
            where = f"{self.source}: " if self.source else ""
            raise ValueError(f"{where}{what}: these statistics hold the same-state records alone (recorded "
                             "without --gdps-summed-statistics), not the summed statistics")

    def counts(self) -> Dict[str, Dict[str, int]]:
        """``counts()[lang][module]``: number of recorded steps."""
        self._require_summed("counts")
        n = self._buffers["n"].cpu()
        return {l: {m: int(n[i, j]) for j, m in enumerate(self.module_names)} for i, l in enumerate(self.languages)}

    def module_sums(self, module: str) -> Dict[str, torch.Tensor]:
        """Sums of ``module`` (CPU float64): ``n`` (L,), ``S`` (L, e), ``Q`` (L,) in S's space,
        ``Q_exact`` (L,) of the original gradients."""
        self._require_summed("module_sums")
        mi = self.module_names.index(module)
        b = self._buffers
        return {"n": b["n"][:, mi].cpu(), "S": b[f"S/{module}"].cpu(),
                "Q": b["Q"][:, mi].cpu(), "Q_exact": b["Q_exact"][:, mi].cpu()}

    def bucket_sums(self, module: str) -> Dict[str, torch.Tensor]:
        """Per-bucket sums of ``module`` in aux space: ``n`` (B, L), ``S`` (B, L, k), ``Q`` (B, L)."""
        self._require_summed("bucket_sums")
        mi = self.module_names.index(module)
        b = self._buffers
        return {"n": b["bucket_n"][:, :, mi].cpu(), "S": b[f"bucket_S/{module}"].cpu(),
                "Q": b["bucket_Q"][:, :, mi].cpu()}

    def subspace_moments(self, module: str) -> Optional[Dict[str, torch.Tensor]]:
        """Projected-gradient moments of ``module`` (None when subspace_dim == 0): ``pair_n``
        (L, L), ``first`` (L, L, r), ``second`` (L, L, r, r), ``cross`` (L, L, r, r); see the
        module docstring."""
        self._require_summed("subspace_moments")
        if not self.subspace_dim:
            return None
        mi = self.module_names.index(module)
        b = self._buffers
        return {"pair_n": b["pair_n"][:, :, mi].cpu(), "first": b[f"first/{module}"].cpu(),
                "second": b[f"second/{module}"].cpu(), "cross": b[f"cross/{module}"].cpu()}

    # ----------------------------------------------------- reduce and merge
    def settings(self) -> dict:
        return {"module_names": list(self.module_names),
                "module_sizes": [self.module_sizes[m] for m in self.module_names],
                "sketch_dim": self.sketch_dim, "subspace_dim": self.subspace_dim, "seed": self.seed,
                "num_buckets": self.num_buckets, "aux_dim": self.aux_dim,
                "probe_units": None if self.same_state is None else list(self.same_state.units),
                "probe_unit_languages": None if self.same_state is None else list(self.same_state.unit_languages),
                "summed": self.summed}

    def to_tensors(self) -> Dict[str, torch.Tensor]:
        """Every sum by name, in a fixed order (what ``state_dict`` saves)."""
        return {name: self._buffers[name] for name, _, _ in self._specs()}

    def _load_buffers(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replace every sum by ``tensors[name]`` (shapes checked first: nothing changes on error)."""
        for name, _, _ in self._specs():
            if name not in tensors:
                raise ValueError(f"lack buffer {name}")
            if tuple(tensors[name].shape) != tuple(self._buffers[name].shape):
                raise ValueError(f"{name} has shape {tuple(tensors[name].shape)}, "
                                 f"expected {tuple(self._buffers[name].shape)}")
        for name, _, _ in self._specs():
            self._buffers[name] = tensors[name].detach().to(device=self.device, dtype=torch.float64).clone()

    def _check_compatible(self, other: "GradientStatistics"):
        where = f"{other.source}: " if other.source else ""
        if self.model_signature != other.model_signature:
            raise ValueError(f"{where}cannot merge statistics of different models (model signature "
                             f"{other.model_signature!r}, expected {self.model_signature!r})")
        if self.settings() != other.settings():
            diff = {k: (other.settings()[k], v) for k, v in self.settings().items() if other.settings()[k] != v}
            raise ValueError(f"{where}cannot merge gradient statistics with different settings "
                             f"(setting: (theirs, ours)): {diff}")

    def merge_(self, other: "GradientStatistics") -> "GradientStatistics":
        """Add ``other``'s sums to these (languages are matched by name). Returns self."""
        self._check_compatible(other)
        self._ensure_languages(other.languages)
        src = torch.tensor([self._lang_index[l] for l in other.languages], dtype=torch.int64, device=self.device)
        for name, _, axes in self._specs():
            o = other._buffers[name].to(self.device)
            t = self._buffers[name]
            if axes == (0, 1):
                t[src[:, None], src[None, :]] += o
            elif axes == (0,):
                t[src] += o
            elif axes == (1,):
                t[:, src] += o
            else:
                t += o
        if self.same_state is not None:
            self.same_state.merge_(other.same_state)
        return self

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "kind": KIND, "model_signature": self.model_signature,
                "languages": list(self.languages), **self.settings(),
                "buffers": {name: self._buffers[name].detach().cpu().clone() for name, _, _ in self._specs()},
                "same_state": None if self.same_state is None else self.same_state.state_dict()}

    @classmethod
    def from_state_dict(cls, d: dict, source: str = "state dict") -> "GradientStatistics":
        if not isinstance(d, dict) or d.get("kind") != KIND:
            kind = d.get("kind") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"{source}: not GDPS gradient statistics (kind {kind!r}, expected {KIND!r})")
        if d.get("format_version") not in READABLE_VERSIONS:
            raise ValueError(f"{source}: gradient statistics format version {d.get('format_version')!r} "
                             f"is not supported (this code reads versions {READABLE_VERSIONS}); "
                             f"record them again with this version's stage 1")
        fields = ("module_names", "module_sizes", "languages", "sketch_dim", "subspace_dim", "seed",
                  "model_signature", "num_buckets", "aux_dim", "buffers")
        missing = [k for k in fields if k not in d]
        if missing:
            raise ValueError(f"{source}: gradient statistics lack {missing}")
        try:
            same_state = d.get("same_state")
            records = None if same_state is None else SameStateRecords.from_state_dict(same_state, source)
            summed = d.get("summed", True)
            if not isinstance(summed, bool):
                raise ValueError(f"summed must be true or false, got {summed!r}")
            if records is None and not summed:
                raise ValueError("no same-state records (and no summed statistics)")
            stats = cls(dict(zip(d["module_names"], d["module_sizes"])), languages=d["languages"],
                        sketch_dim=d["sketch_dim"], subspace_dim=d["subspace_dim"], seed=d["seed"],
                        model_signature=d["model_signature"], num_buckets=d["num_buckets"], aux_dim=d["aux_dim"],
                        probe_units=None if summed else records.units,
                        probe_unit_languages=None if summed else records.unit_languages, summed=summed)
            stats.same_state = records
            stats._load_buffers(d["buffers"])
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{source}: malformed gradient statistics ({exc})") from None
        stats.source = source
        return stats

    def save(self, path) -> None:
        """Write atomically (temporary file in the same folder, then ``os.replace``)."""
        with atomic_write(path, "wb") as f:
            torch.save(self.state_dict(), f)

    @classmethod
    def load(cls, path, expect_signature: Optional[str] = None) -> "GradientStatistics":
        path = os.fspath(path)
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets one clear message
            raise ValueError(f"{path}: cannot read gradient statistics ({exc})") from exc
        stats = cls.from_state_dict(d, source=path)
        if expect_signature is not None and stats.model_signature != expect_signature:
            raise ValueError(f"{path}: gradient statistics were recorded for model signature "
                             f"{stats.model_signature!r}, expected {expect_signature!r}")
        return stats

    def __repr__(self):
        return (f"GradientStatistics(modules={len(self.module_names)}, languages={self.languages}, "
                f"steps={self.num_steps}, sketch_dim={self.sketch_dim}, subspace_dim={self.subspace_dim})")


def _add_at(sums: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
    """``sums[idx[a], idx[b]] += values[a, b]`` for a (L, L, ...) sum and (n, n, ...) values, in
    place: every language pair (i, j) at once when all L languages are given, else row by row."""
    if idx.numel() == sums.size(0) and bool((idx == torch.arange(idx.numel(), device=idx.device)).all()):
        sums.add_(values)
        return
    for a in range(idx.numel()):
        sums[idx[a]].index_add_(0, idx, values[a])


class ProbeRecording:
    """One probed update recorded block by block: ``add_block`` for every module (any order),
    then ``finish``. Records exactly what ``GradientStatistics.add_probe`` records with all rows
    at once (``add_probe`` is this), but needs only one block's (2U, d) half-gradient rows at a
    time: a block's Gram matrix and its languages' rows (reduced at once to the stored, sketched
    space when ``sketch_dim`` is set) are formed when the block is given, and its rows may be
    dropped afterwards. So the probe's transient memory is one block's rows, not every tracked
    parameter times 2U (the probe, ``tasks/gradient_probe.py``, streams blocks this way).
    Nothing is added to the sums before ``finish``: a language with a non-finite value in any
    block is still left out of every block, and a probe with any non-finite row keeps no Gram
    matrix. Statistics without the summed part (``summed=False``) take the Gram matrices alone;
    a probe they cannot keep counts as skipped for the languages of its non-finite halves."""

    def __init__(self, stats: GradientStatistics, step: int, tokens: torch.Tensor, batch_key: Optional[int] = None):
        if stats.same_state is None:
            raise ValueError("add_probe: these statistics have no probe units (construct with probe_units)")
        rec = stats.same_state
        R = 2 * len(rec.units)
        tokens = torch.as_tensor(tokens, dtype=torch.float64).reshape(-1)
        if tokens.numel() != R:
            raise ValueError(f"add_probe: expected {R} token counts (2 halves x {len(rec.units)} units), got {tokens.numel()}")
        self.stats, self.step, self.tokens, self.R = stats, int(step), tokens, R
        self.batch_key = batch_key
        self.languages = rec.languages
        # language row = sum over its halves of (tokens_r / tokens_language) * row_r
        member = torch.zeros(len(self.languages), R, dtype=torch.float64)
        for u, lang in enumerate(rec.unit_languages):
            member[self.languages.index(lang), 2 * u: 2 * u + 2] = 1.0
        lang_tokens = member @ tokens
        self.present = torch.nonzero(lang_tokens > 0).flatten()
        self.present_languages = [self.languages[i] for i in self.present.tolist()]
        self.mix = ((member * tokens[None]) / lang_tokens.clamp(min=1e-30)[:, None])[self.present]
        self.grams: Dict[str, torch.Tensor] = {}
        self.results: Dict[str, tuple] = {}

    @torch.no_grad()
    def add_block(self, module: str, rows: torch.Tensor) -> None:
        """``rows``: (2U, d) per-target-token gradient of every half of ``module``."""
        self._check_module(module)
        Y = rows.detach().to(torch.float64)
        if tuple(Y.shape) != (self.R, self.stats.module_sizes[module]):
            raise ValueError(f"add_probe: rows of {module!r} have shape {tuple(Y.shape)}, "
                             f"expected ({self.R}, {self.stats.module_sizes[module]})")
        lang_rows = None
        if self.present.numel() and self.stats.summed:
            lang_rows = torch.matmul(self.mix.to(Y.device), Y, out=self.language_rows(module, Y.device))
        self.add_block_terms(module, Y @ Y.T, lang_rows)

    def language_rows(self, module: str, device) -> torch.Tensor:
        """The (present languages, d) float64 buffer that ``add_block_terms`` takes the
        languages' per-token rows of ``module`` in (row k: ``self.mix[k] @ rows``)."""
        return self.stats._probe_rows_buffer(module, len(self.present), device)

    @torch.no_grad()
    def add_block_terms(self, module: str, gram: torch.Tensor, lang_rows: Optional[torch.Tensor]) -> None:
        """A block given by what is recorded of it: the (2U, 2U) Gram matrix of its half rows and,
        for statistics with the summed part, the present languages' per-token rows in the buffer
        of :meth:`language_rows` (``self.mix @ rows``). ``add_block`` forms both from the rows;
        ``record_blockwise`` from a capture's shares without forming the rows."""
        self._check_module(module)
        self._check_active()
        if tuple(gram.shape) != (self.R, self.R):
            raise ValueError(f"add_probe: Gram matrix of {module!r} has shape {tuple(gram.shape)}, expected "
                             f"({self.R}, {self.R})")
        self.grams[module] = gram.to(torch.float64).cpu()
        if self.present.numel() and self.stats.summed:
            if lang_rows is None:
                raise ValueError(f"add_probe: these statistics keep the summed part: the languages' rows of "
                                 f"{module!r} are needed")
            self.results[module] = self.stats._prepare(module, self.present_languages, lang_rows)

    def _check_module(self, module: str) -> None:
        if module not in self.stats.module_sizes:
            raise ValueError(f"add_probe: untracked module {module!r}")
        if module in self.grams:
            raise ValueError(f"add_probe: module {module!r} given twice")

    def _check_active(self) -> None:
        if self.stats._active_probe is not self:
            raise RuntimeError(f"add_probe: the probe of step {self.step} was overtaken by another probe of the "
                               "same statistics before it finished (one probe at a time)")

    def finish(self) -> List[str]:
        """Keep the Gram matrices and record the languages' rows. Returns the skipped languages."""
        stats = self.stats
        self._check_active()
        missing = [m for m in stats.module_names if m not in self.grams]
        if missing:
            raise ValueError(f"add_probe: no rows for modules {missing}")
        stats._active_probe = None
        if self.present.numel() == 0:
            return []
        grams = torch.stack([self.grams[m] for m in stats.module_names])
        finite = bool(torch.isfinite(grams).all())
        if finite:
            stats.same_state.add(self.step, self.tokens, grams, self.batch_key)
        if stats.summed:
            return stats._commit(self.step, self.present_languages, [self.results[m] for m in stats.module_names])
        if finite:
            stats._buffers["steps"] += 1
            return []
        # the languages of the halves with a non-finite gradient (a non-finite squared norm)
        rows = torch.nonzero((~torch.isfinite(torch.diagonal(grams, dim1=1, dim2=2))).any(0)).flatten().tolist()
        skipped = list(dict.fromkeys(stats.same_state.unit_languages[r // 2] for r in rows))
        for lang in skipped:
            stats._buffers["skipped"][stats._lang_index[lang]] += 1
        return skipped


def synthetic_statistics(module_sizes: Mapping[str, int], languages: Sequence[str],
                         clusters: Optional[Mapping[str, Sequence[int]]] = None, steps: int = 40,
                         signal: float = 1.0, noise: float = 1.0, shared: float = 0.0, own: float = 0.0,
                         seed: int = 0, **kwargs) -> GradientStatistics:
    """Planted statistics for tests and benchmarks: ``steps`` probes with every language present,
    one probe unit per language, recorded through ``add_probe`` as the probe records them.

    For module m, language l in cluster ``clusters[m][l]`` (all in cluster 0 when m is not in
    ``clusters``) has expected gradient ``signal * sqrt(d) * unit(sqrt(shared) c + sqrt(1 - shared
    - own) u_k + sqrt(own) v_l)`` with c, u_k, v_l independent random directions. Each of a
    probe's two equal halves adds N(0, 2 noise^2) per coordinate, so a language's step (the mean of
    its halves) adds N(0, noise^2). Similarities are then about 1 - own within a cluster and
    ``shared`` across clusters; self-similarity about signal^2 / (signal^2 + noise^2)."""
    gen = torch.Generator().manual_seed(int(seed))
    langs = list(languages)
    means = {}
    for m, d in module_sizes.items():
        lab = list(clusters[m]) if clusters and m in clusters else [0] * len(langs)
        c = torch.randn(d, generator=gen, dtype=torch.float64)
        u = {k: torch.randn(d, generator=gen, dtype=torch.float64) for k in sorted(set(lab))}
        rows = []
        for i in range(len(langs)):
            v = torch.randn(d, generator=gen, dtype=torch.float64)
            mu = math.sqrt(shared) * c + math.sqrt(max(0.0, 1 - shared - own)) * u[lab[i]] + math.sqrt(own) * v
            rows += [mu / mu.norm() * signal * math.sqrt(d)] * 2
        means[m] = torch.stack(rows)
    stats = GradientStatistics(module_sizes, languages=langs, seed=seed, probe_units=langs, **kwargs)
    tokens = torch.ones(2 * len(langs), dtype=torch.float64)
    half_noise = noise * math.sqrt(2.0)
    for t in range(steps):
        stats.add_probe(t, tokens, {m: means[m] + half_noise * torch.randn(means[m].shape, generator=gen,
                                                                           dtype=torch.float64)
                                    for m in module_sizes})
    return stats
