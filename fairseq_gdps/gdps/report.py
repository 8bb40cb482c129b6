"""The GDPS analysis (statistics -> metrics -> ranking -> grouping -> ratio -> plan) and its report.

Two estimators. Statistics recorded by this version's probe carry same-state records
(``same_state.py``): the decision (block ranking, identifiability, groups, ratio) then comes
from ``conflict.py``, with bootstrap intervals over probes, and the summed-statistics metrics
(``metrics.py``: corrected cosines, subspace alignment, CCA) are reported beside it as
diagnostics. Older statistics have no such records: the decision then falls back to the
summed-statistics estimator, whose cross and self terms come from different model states, and
the report says so at the top.

``analyze`` runs the analysis; ``write_outputs`` writes ``plan.json``, ``report.md`` and the PNG
plots (``similarity.png``, ``dendrogram.png``, ``layer_profile.png``, ``stability.png``). Figures
use matplotlib's Agg canvas directly (no pyplot, no global backend switch).

Module choice. Modules are ranked by ``metrics``' conflict score. The modules to split are the
explicit ``modules`` if given, else the top one (``select="top1"``, the default: the paper splits
a single FFN) or the top ``top_k`` (``select="topk"``). The grouping distance is aggregated over
the explicit ``modules`` if given, else over the top ``top_k`` ranked modules.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from fairseq_gdps.gdps import conflict as C
from fairseq_gdps.gdps import grouping as G
from fairseq_gdps.gdps import metrics as M
from fairseq_gdps.gdps.plan import Plan
from fairseq_gdps.atomic import atomic_write, file_sha256

LAYER_RE = re.compile(r"^(?P<stack>.+?)\.(?P<layer>\d+)\.(?P<rest>.+)$")


def parse_layer(name: str):
    """``encoder.conformer_layers.11.ffn2`` -> (``encoder.conformer_layers.*.ffn2``, 11); None if no index."""
    m = LAYER_RE.match(name)
    if not m:
        return None
    return f"{m['stack']}.*.{m['rest']}", int(m["layer"])


@dataclass
class Analysis:
    stats_path: str
    stats_sha256: str
    languages: List[str]
    metrics: Dict[str, M.ModuleMetrics]
    ranking: List[str]
    split_modules: List[str]
    grouping: G.GroupingResult
    ratio: float
    ratio_raw: float
    ratio_rule: str                    # "conflict" (groups from conflict edges: --conflict-shared-ratio) or "similarity"
    ratio_similarity_rule: float       # what the similarity rule gives (= ratio unless conflict groups)
    settings: dict
    stats_info: dict
    clipped: Dict[str, int]            # corrected cosines beyond +-1 over all modules (metrics.clipped_pairs)
    notes: List[str] = field(default_factory=list)
    conflict: Optional[C.ConflictAnalysis] = None   # the same-state decision (None: old statistics)

    @property
    def estimator(self) -> str:
        return "same-state" if self.conflict is not None else "summed (drift-prone)"

    @property
    def estimator_warning(self) -> Optional[str]:
        """Why the decision may not reflect measured conflict: statistics without same-state
        records, or (old estimator) most corrected cosines clipped."""
        if self.conflict is not None:
            return None
        if self.clipped["pairs"] and self.clipped["clipped"] >= self.clipped["pairs"] / 2:
            return ESTIMATOR_WARNING.format(**self.clipped)
        return NO_SAME_STATE_WARNING

    def _same_state_scores(self) -> Dict[str, dict]:
        ca = self.conflict
        out = {}
        for rank, b in enumerate(ca.candidates + [r for r in ca.reference_blocks], 1):
            e = ca.estimates[b]
            out[b] = {"same_state_conflict": e.score, "same_state_conflict_interval": list(e.score_interval),
                      "same_state_rank": rank if b in ca.candidates else None,
                      "reference_block": b in ca.reference_blocks,
                      "same_state_rho_mean": M._mean_upper(e.rho),
                      "identifiable": e.identifiability_state}
            if e.identifiability is not None:
                out[b]["identifiability"] = e.identifiability
        return out

    def plan(self) -> Plan:
        scores = {m: self.metrics[m].scores() if m in self.metrics else {} for m in self.ranking}
        for rank, m in enumerate(self.ranking, 1):
            scores[m]["rank"] = rank
        if self.conflict is not None:
            for m, extra in self._same_state_scores().items():
                scores[m].update(extra)
        g = self.grouping
        provenance = {
            "tool": "gdps-analyze",
            "stats_file": self.stats_path,
            "stats_sha256": self.stats_sha256,
            "stats": self.stats_info,
            "settings": self.settings,
            "grouping": {"modules": g.modules, "source": g.source, "rule": g.info.get("rule"),
                         "distance": g.distance.tolist(), "languages": g.languages,
                         "chosen_frequency": g.chosen_frequency, "resamples": g.resamples,
                         "frequencies": [{"groups": [list(x) for x in p], "frequency": f} for p, f in g.frequencies]},
            "ratio": {"mean_cross_group_corrected_cos": self.ratio_raw, "quantised": self.ratio,
                      "rule": self.ratio_rule, "similarity_rule": self.ratio_similarity_rule},
            "corrected_cosines_clipped": self.clipped,
            "estimator": self.estimator,
        }
        if self.conflict is not None:
            ca = self.conflict
            provenance["same_state"] = {
                "probes": ca.probes, "batches": ca.batches, "window": list(ca.window), "probed_updates": list(ca.updates),
                "reference_blocks": ca.reference_blocks, "candidates": ca.candidates,
                "separation": ca.separation, "resamples": ca.resamples, "interval_level": ca.level,
                "distinct_level": ca.distinct_level, "unit_level": ca.unit_level, "rho_beyond_one": ca.beyond_one,
                "rho": {b: ca.estimates[b].rho for b in ca.blocks},
                "languages": ca.languages,
            }
        return Plan(modules=self.split_modules, groups=g.groups, shared_ratio=self.ratio, scores=scores,
                    provenance=provenance)


SUMMED_UNAVAILABLE = (
    "summed-statistics diagnostics (noise-corrected and raw cosines, self-similarity, divergence, subspace "
    "alignment, CCA) unavailable: these statistics hold the same-state records alone (stage 1 ran "
    "without --gdps-summed-statistics); the decision does not use them")

ESTIMATOR_WARNING = (
    "WARNING: in {clipped} of {pairs} language pairs (all modules) the noise-corrected cosine came out beyond "
    "+-1, more than independent steps around one expected gradient allow: the recorded steps are not such "
    "draws (the expected gradient drifts while the model trains, and steps share batches). The divergences "
    "are then mostly zero, and the module ranking and the grouping below do not reflect measured conflict. "
    "Probe a later, stabler stretch of training (--gdps-probe-start) over more steps, and read the raw "
    "cosines and the per-step conflict estimates beside the decision.")


NO_SAME_STATE_WARNING = (
    "WARNING: no same-state probe records in the analysed window (statistics recorded before they existed, or "
    "a window without probes): the decision below comes from the summed estimator, whose cross-language terms "
    "and self terms are taken at different model states. Record the statistics again with this version's "
    "probe, or widen the window.")


def analyze(stats, stats_path: str = "", *, modules: Optional[Sequence[str]] = None, select: str = "top1",
            top_k: int = 3, n_groups: Optional[int] = None, threshold: Optional[float] = None,
            ratio_min: float = 0.25, ratio_max: float = 0.75, ratio_step: float = 0.125, resamples: int = 1000,
            seed: int = 0, subspace_rank: int = 8, ridge: float = 0.1, alignment_weight: float = 0.5,
            silhouette_min: float = 0.25, min_split_distance: float = 0.1, window_start: Optional[int] = None,
            window_end: Optional[int] = None, reference: str = "encoder.*", conflict_tau: float = 0.1,
            identifiability_margin: float = 0.05, interval_level: float = 0.9,
            distinct_level: Optional[float] = None, min_reference_agreement: float = 0.5,
            conflict_shared_ratio: Optional[float] = 0.0) -> Analysis:
    if select not in ("top1", "topk"):
        raise ValueError(f"select must be 'top1' or 'topk', got {select!r}")
    if top_k < 1:
        raise ValueError("top_k must be >= 1")
    if modules:
        unknown = [m for m in modules if m not in stats.module_names]
        if unknown:
            raise ValueError(f"modules {unknown} are not in the statistics (recorded: {', '.join(stats.module_names)})")
    notes: List[str] = []
    if stats.summed:
        counts = stats.counts()
        steps_per_language = {l: max(counts[l].values()) for l in stats.languages}
    else:   # the same-state records alone: a language's steps are the probes with its tokens
        steps_per_language = stats.same_state.probes_per_language()
    languages = [l for l in stats.languages if steps_per_language.get(l, 0) > 0]
    dropped = [l for l in stats.languages if l not in languages]
    if dropped:
        notes.append(f"languages without any recorded step left out: {dropped}")
    if not languages:
        raise ValueError(f"{stats_path or 'statistics'}: no language has any recorded step")
    few = [l for l in languages if stats.summed and min(counts[l].values()) < 2]
    if few:
        notes.append(f"languages with fewer than 2 steps in some module (no self-similarity): {few}")
    skipped = {l: c for l, c in stats.skipped_nonfinite.items() if c}
    if skipped:
        notes.append(f"steps skipped for non-finite gradients: {skipped}")
    metrics: Dict[str, M.ModuleMetrics] = {}
    if stats.summed:
        mkw = dict(subspace_rank=subspace_rank, ridge=ridge, alignment_weight=alignment_weight, languages=languages)
        metrics = M.compute_all(stats, **mkw)
        for mm in metrics.values():
            notes.extend(mm.notes)
    else:
        notes.append(SUMMED_UNAVAILABLE)
    ca = None
    rec = stats.same_state
    probes = 0 if rec is None else len(rec.arrays(window_start, window_end)[0])
    if probes >= 2:
        ca = C.analyse(rec, window_start, window_end, reference=reference, resamples=resamples, seed=seed,
                       level=interval_level, identifiability_margin=identifiability_margin, languages=languages,
                       distinct_level=distinct_level)
        tail = ca.resamples * (1 - ca.distinct_level) / 2
        if 0 < tail < 5:
            notes.append(f"the distinctness intervals (level {ca.distinct_level:.3g}) rest on {tail:.1f} bootstrap "
                         f"replicates in each tail of {ca.resamples}: raise --resamples to about "
                         f"{int(np.ceil(20 / (1 - ca.distinct_level)))} for tails of 10")
    elif not stats.summed:
        raise ValueError(f"{stats_path or 'statistics'}: {probes} same-state probe(s) in the window "
                         f"[{window_start}, {window_end}), at least 2 needed; these statistics hold the same-state "
                         "records alone (recorded without --gdps-summed-statistics), so there is no summed estimator to "
                         "fall back on")
    elif rec is not None:
        notes.append(f"fewer than 2 same-state probes in the window [{window_start}, {window_end}): the summed "
                     "estimator decides (see the warning)")
    if ca is not None:
        ranking = ca.candidates + ca.reference_blocks
        split_modules, grouping, rho = _same_state_decision(ca, modules, select, top_k, n_groups, threshold,
                                                            conflict_tau, min_reference_agreement, notes)
    else:
        ranking = M.rank_modules(metrics)
        k = min(top_k, len(ranking))
        if modules:
            split_modules = list(modules)
            group_modules = list(modules)
        else:
            split_modules = ranking[:1] if select == "top1" else ranking[:k]
            group_modules = ranking[:k]
        grouping = G.group_languages(stats, group_modules, languages, n_groups=n_groups, threshold=threshold,
                                     resamples=resamples, seed=seed, silhouette_min=silhouette_min,
                                     min_split_distance=min_split_distance)
        rho = np.mean([metrics[m].corrected_cos for m in split_modules], axis=0)
    rule_ratio, ratio_raw = G.shared_ratio(rho, grouping.partition, languages, ratio_min, ratio_max, ratio_step)
    ratio = rule_ratio
    from_conflict = grouping.source == "conflict" and len(grouping.partition) > 1
    if from_conflict and conflict_shared_ratio is not None:
        # The groups were put apart because their gradients conflict in this very block: units they
        # share carry the conflict again. Measured on the quality benchmark's planted conflict
        # (docs/benchmarks.md): none shared against the similarity rule's share, +5.4/+1.3/+3.1
        # BLEU in the 3 seeds that chose this rule, -0.1/0.0 in 2 fresh seeds: never worse.
        ratio, ratio_rule = float(conflict_shared_ratio), "conflict"
    else:
        ratio_rule = "similarity"
    if len(grouping.partition) == 1:
        notes.append("a single group: every language uses the same private block, so the split changes "
                     "nothing but capacity layout; consider --groups K to force a split")
    settings = {"modules": list(modules) if modules else None, "select": select, "top_k": top_k,
                "groups": n_groups, "distance_threshold": threshold, "ratio_min": ratio_min,
                "ratio_max": ratio_max, "ratio_step": ratio_step, "resamples": resamples, "seed": seed,
                "subspace_rank": subspace_rank, "ridge": ridge, "alignment_weight": alignment_weight,
                "silhouette_min": silhouette_min, "min_split_distance": min_split_distance,
                "window_start": window_start, "window_end": window_end, "reference_blocks": reference,
                "conflict_tau": conflict_tau, "min_reference_agreement": min_reference_agreement,
                "identifiability_margin": identifiability_margin,
                "interval_level": interval_level, "distinct_level": distinct_level,
                "conflict_shared_ratio": conflict_shared_ratio}
    stats_info = {"languages": list(stats.languages), "steps": stats.num_steps,
                  "steps_per_language": steps_per_language,
                  "skipped_nonfinite": stats.skipped_nonfinite, "model_signature": stats.model_signature,
                  "sketch_dim": stats.sketch_dim, "subspace_dim": stats.subspace_dim,
                  "num_buckets": stats.num_buckets, "aux_dim": stats.aux_dim, "seed": stats.seed,
                  "modules": len(stats.module_names)}
    sha = file_sha256(stats_path) if stats_path and os.path.isfile(stats_path) else ""
    return Analysis(stats_path=str(stats_path), stats_sha256=sha, languages=languages, metrics=metrics,
                    ranking=ranking, split_modules=split_modules, grouping=grouping, ratio=ratio,
                    ratio_raw=ratio_raw, ratio_rule=ratio_rule, ratio_similarity_rule=rule_ratio,
                    settings=settings, stats_info=stats_info,
                    clipped=M.clipped_pairs(metrics), notes=notes, conflict=ca)


def _same_state_decision(ca: C.ConflictAnalysis, modules, select, top_k, n_groups, threshold, tau, min_reference,
                         notes):
    """(split modules, grouping, rho of the split modules) from the same-state analysis."""
    langs = ca.languages
    if modules:
        split = list(modules)
    else:
        split = ca.candidates[:1] if select == "top1" else ca.candidates[:min(top_k, len(ca.candidates))]
    if not split:
        split = ca.reference_blocks[-1:]
        notes.append("every tracked block is a reference block: the last one is named for the split")
    if ca.separation is not None and not ca.separation["separated"] and not modules:
        sep = ca.separation
        notes.append(f"the top blocks are not separated: conflict score of `{sep['top']}` minus `{sep['next']}` "
                     f"{sep['difference']:.3f}, {int(100 * ca.level)}% interval [{sep['interval'][0]:.3f}, "
                     f"{sep['interval'][1]:.3f}] includes 0")
    unidentified = [b for b in split if not ca.estimates[b].identifiable]
    undetermined = [b for b in split if ca.estimates[b].identifiability_state == "undetermined"]
    if undetermined:
        notes.append(f"whether {', '.join(undetermined)} tells languages apart from speakers is undetermined: the "
                     "speaker-level estimates are too thin (few utterances per speaker and batch); the split is "
                     "not vetoed, and it rests on the language-level estimates alone")
    rho = np.mean([ca.estimates[b].rho for b in split], axis=0)
    if n_groups is not None:
        # forced K (e.g. the Parameter Differentiation rule): average linkage on 1 - same-state rho
        partition, info = G.cluster(G._to_distance(rho), langs, n_groups=n_groups)
        cg = None
    elif unidentified:
        partition = (tuple(langs),)
        info = {"rule": (f"languages are not told apart from speakers in {', '.join(unidentified)} (within-language "
                         "cross-speaker agreement below cross-language agreement plus the margin, over the whole "
                         "interval): no split along languages")}
        notes.append(info["rule"])
        cg = None
    else:
        cg = C.group(ca, split, tau=tau if threshold is None else threshold, min_reference=min_reference)
        partition, info = cg.partition, {"rule": cg.rule, "edges": cg.edges}
    grouping = G.GroupingResult(languages=langs, modules=split, distance=1.0 - rho, partition=partition, info=info,
                                source="conflict" if cg is not None else "similarity")
    if cg is not None:
        grouping.frequencies, grouping.chosen_frequency = cg.frequencies, cg.chosen_frequency
        grouping.coassignment, grouping.resamples = cg.coassignment, cg.resamples
    return split, grouping, rho


# ------------------------------------------------------------------------ markdown
def _f(x, nd=3):
    if x is None:
        return "-"
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    return "-" if not np.isfinite(x) else f"{x:.{nd}f}"


def _matrix_md(mat, labels, nd=3):
    lines = ["| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for i, l in enumerate(labels):
        lines.append(f"| **{l}** | " + " | ".join(_f(v, nd) for v in mat[i]) + " |")
    return lines


def _groups_str(p):
    return " / ".join("{" + ", ".join(g) + "}" for g in p)


def report_markdown(a: Analysis, figures: Sequence[str] = ()) -> str:
    langs = a.languages
    out = ["# GDPS gradient analysis", ""]
    out += [f"- statistics: `{a.stats_path}` (sha256 `{a.stats_sha256[:16]}`)",
            f"- languages: {', '.join(langs)}; recorded steps: {a.stats_info['steps']}; steps per language: "
            + ", ".join(f"{l} {n}" for l, n in a.stats_info["steps_per_language"].items()),
            (f"- sketch_dim {a.stats_info['sketch_dim']}, subspace_dim {a.stats_info['subspace_dim']}, "
             f"{a.stats_info['num_buckets']} buckets" if a.metrics
             else "- same-state records alone (no summed statistics)")
            + f"; model signature `{a.stats_info['model_signature']}`", ""]
    out += ["## Decision", "",
            f"- split modules: {', '.join(f'`{m}`' for m in a.split_modules)}",
            f"- groups: {_groups_str(a.grouping.partition)} ({a.grouping.info.get('rule')})",
            f"- shared ratio: **{a.ratio:g}**", ""]
    out += [f"**{a.estimator_warning}**", ""] if a.estimator_warning else []
    if a.conflict is not None:
        out += _same_state_markdown(a)
    if a.metrics:
        out += _summed_markdown(a)
    else:
        out += ["## Summed-statistics diagnostics", "", f"{SUMMED_UNAVAILABLE[0].upper()}{SUMMED_UNAVAILABLE[1:]}.", ""]
    g = a.grouping
    # what the grouping and the ratio were computed from (same-state statistics may lack the cosines)
    similarity = "same-state similarity" if a.conflict is not None else "noise-corrected cosine"
    how = ("average linkage of this distance." if g.info.get("linkage") is not None else
           "the groups come from conflict edges (see above), not from clustering this distance; it is shown "
           "for reference.")
    out += ["## Language grouping", "",
            f"Distance = 1 - {similarity}, averaged over {', '.join(f'`{m}`' for m in g.modules)}; {how}", ""]
    out += _matrix_md(g.distance, langs) + [""]
    out += [f"- rule: {g.info.get('rule')}"]
    if g.info.get("silhouettes"):
        out += ["- silhouettes: " + ", ".join(f"{k} groups {_f(v)}" for k, v in g.info["silhouettes"].items())]
    out += [f"- chosen: {_groups_str(g.partition)}", ""]
    if g.resamples:
        resampled = ("the probed batches" if a.conflict is not None
                     else f"the {a.stats_info['num_buckets']} step buckets")
        out += [f"Stability over {g.resamples} bootstrap resamples of {resampled}: the chosen grouping came out "
                f"in **{100 * g.chosen_frequency:.1f}%**.", "",
                "| grouping | frequency |", "|---|---|"]
        out += [f"| {_groups_str(p)}{' (chosen)' if p == g.partition else ''} | {100 * f:.1f}% |"
                for p, f in g.frequencies[:10]]
        if len(g.frequencies) > 10:
            out.append(f"| ({len(g.frequencies) - 10} more) | {100 * sum(f for _, f in g.frequencies[10:]):.1f}% |")
        out += ["", "Co-assignment (share of resamples in which two languages share a group):", ""]
        out += _matrix_md(g.coassignment, langs, nd=2) + [""]
    st = a.settings
    out += ["## Shared ratio", ""]
    if a.ratio_rule == "conflict":
        out += [f"The groups come from conflict edges: they were put apart because their gradients conflict in "
                f"the split block, and units they shared would carry the conflict again. **{a.ratio:g}** of the "
                f"split block stays shared (`--conflict-shared-ratio`; `--conflict-shared-ratio similarity` "
                f"restores the similarity rule, which would have kept {a.ratio_similarity_rule:g}: mean "
                f"{similarity} between languages of different groups {_f(a.ratio_raw)}, clipped to "
                f"[{st['ratio_min']:g}, {st['ratio_max']:g}] and quantised to steps of {st['ratio_step']:g}).", ""]
    else:
        out += [f"Mean {similarity} between languages of different groups on the split module(s): "
                f"{_f(a.ratio_raw)}. Clipped to [{st['ratio_min']:g}, {st['ratio_max']:g}] and quantised to steps "
                f"of {st['ratio_step']:g}: **{a.ratio:g}** of each split module stays shared, the rest becomes one "
                "private block per group. Groups that still agree keep more shared capacity.", ""]
    if a.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in a.notes] + [""]
    if figures:
        out += ["## Figures", ""] + [f"![{os.path.splitext(f)[0]}]({f})" for f in figures] + [""]
    return "\n".join(out)


def _summed_markdown(a: Analysis) -> List[str]:
    """The summed estimator's module ranking and the top modules' similarities (statistics with
    the summed part)."""
    langs = a.languages
    out = ["## Modules ranked by the summed estimator" + (" (diagnostic: not what decides)" if a.conflict else ""), "",
           "conflict score = divergence x ((1 - w) + w x (1 - subspace alignment)), "
           f"w = {a.settings['alignment_weight']}; divergence = mean over pairs of (1 - noise-corrected cosine) / 2.", "",
           "| rank | module | conflict score | divergence | neg. pairs | step conflict (Gauss.) | corr. cos mean | "
           "corr. cos min | raw cos mean | self-sim mean | subspace align. | CCA |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r, m in enumerate(a.ranking, 1):
        s = a.metrics[m].scores()
        out.append(f"| {r} | `{m}` | {_f(s['conflict_score'])} | {_f(s['divergence'])} | {_f(s['conflict_rate'], 2)} | "
                   f"{_f(s['step_conflict_rate'])} | {_f(s['corrected_cos_mean'])} | {_f(s['corrected_cos_min'])} | "
                   f"{_f(s['raw_cos_mean'])} | {_f(s['self_cos_mean'])} | {_f(s['subspace_alignment'])} | "
                   f"{_f(s['cca_mean'])} |")
    out.append("")
    shown = list(dict.fromkeys(a.split_modules + a.ranking[:min(3, len(a.ranking))]))
    out += ["## Similarity of the top modules", ""]
    for m in shown:
        mm = a.metrics[m]
        out += [f"### `{m}`", "", "Noise-corrected cosine of mean gradients:", ""]
        out += _matrix_md(mm.corrected_cos, langs) + [""]
        out += ["Raw cosine of mean gradients:", ""] + _matrix_md(mm.raw_cos, langs) + [""]
        out += ["Self-similarity (share of gradient energy consistent across steps): "
                + ", ".join(f"{l} {_f(v)}" for l, v in zip(langs, mm.self_cos)), ""]
        if np.isfinite(mm.step_conflict_prob).any():
            out += ["Per-step P(negative inner product), Gaussian estimate in the projected space:", ""]
            out += _matrix_md(mm.step_conflict_prob, langs) + [""]
    return out


# ------------------------------------------------------------------------ figures
def _canvas(w, h):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", metadata={"Software": None})


def _same_state_markdown(a: Analysis) -> List[str]:
    ca = a.conflict
    langs = ca.languages
    lvl = f"{int(round(100 * ca.level))}%"
    out = ["## Same-state analysis (what decides)", "",
           f"- {ca.probes} probes of {ca.batches} distinct batches, updates {ca.updates[0]}-{ca.updates[1]} "
           f"(window {ca.window[0]}..{ca.window[1]}); {ca.resamples} bootstrap resamples of the batches, {lvl} "
           "percentile intervals",
           f"- a pair is measurably two languages in a block when its similarity interval at level "
           f"{ca.distinct_level:.3g} lies below 1 there"
           + (f" (the {lvl} level over the {len(ca.blocks)} blocks)"
              if np.isclose(ca.distinct_level, C.default_distinct_level(ca.level, len(ca.blocks))) else "")
           + "; a pair that no block tells apart is one language, kept in one group",
           f"- reference (input-side) blocks: {', '.join(f'`{b}`' for b in ca.reference_blocks)}; "
           "conflict(i, j) at a block = agreement on the reference minus agreement at the block",
           f"- estimates beyond +-1: {ca.beyond_one['pairs_beyond_one']} of {ca.beyond_one['pairs']} pair-blocks "
           "(sampling noise only: every term is taken at one model state)"]
    if ca.separation is not None:
        sep = ca.separation
        out.append(f"- top candidate `{sep['top']}` vs next `{sep['next']}`: score difference {_f(sep['difference'])} "
                   f"[{_f(sep['interval'][0])}, {_f(sep['interval'][1])}]: "
                   + ("**separated**" if sep["separated"] else "**not separated** (the interval includes 0)"))
    out += ["", "| rank | block | conflict score | interval | mean same-state rho | within-language (cross-speaker) | "
            "cross-language | margin interval | languages identifiable |", "|---|---|---|---|---|---|---|---|---|"]
    for rank, b in enumerate(ca.candidates + ca.reference_blocks, 1):
        e = ca.estimates[b]
        idf = e.identifiability
        cells = ([_f(idf["within_language"]), _f(idf["cross_language"]),
                  f"[{_f(idf['margin_interval'][0])}, {_f(idf['margin_interval'][1])}]",
                  {"yes": "yes", "no": "**no**"}.get(e.identifiability_state, e.identifiability_state)]
                 if idf else ["-", "-", "-", "(no speaker units)"])
        out.append(f"| {rank if b in ca.candidates else 'ref'} | `{b}` | {_f(e.score)} | "
                   f"[{_f(e.score_interval[0])}, {_f(e.score_interval[1])}] | {_f(M._mean_upper(e.rho))} | "
                   + " | ".join(cells) + " |")
    out.append("")
    for b in list(dict.fromkeys(a.split_modules + ca.candidates[:2])):
        e = ca.estimates[b]
        out += [f"### `{b}`", "", "Same-state similarity rho (point; interval below):", ""]
        out += _matrix_md(e.rho, langs) + [""]
        lo, hi = e.rho_interval
        interval = np.array([[f"{_f(lo[i, j], 2)}..{_f(hi[i, j], 2)}" for j in range(len(langs))]
                             for i in range(len(langs))], dtype=object)
        out += [f"{lvl} intervals:", ""] + _matrix_md(interval, langs) + [""]
        out += ["Conflict (reference agreement minus this block's):", ""] + _matrix_md(e.conflict, langs) + [""]
        out += ["Half-batch self-cosine (signal share of one half's gradient): "
                + ", ".join(f"{l} {_f(v)}" for l, v in zip(langs, e.self_cos)), ""]
    return out


def plot_similarity(a: Analysis, path: str, max_modules: int = 4) -> None:
    shown = list(dict.fromkeys(a.split_modules + a.ranking))[:max_modules]
    L = len(a.languages)
    fig = _canvas(3.6 * len(shown) + 0.8, 3.6)
    im = None
    for k, m in enumerate(shown):
        ax = fig.add_subplot(1, len(shown), k + 1)
        mat = a.conflict.estimates[m].rho if a.conflict is not None else a.metrics[m].corrected_cos
        im = ax.imshow(mat, vmin=-1, vmax=1, cmap="RdBu")
        ax.set_xticks(range(L), a.languages, rotation=45)
        ax.set_yticks(range(L), a.languages)
        for i in range(L):
            for j in range(L):
                if np.isfinite(mat[i, j]):
                    ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7)
        score = a.conflict.estimates[m].score if a.conflict is not None else a.metrics[m].conflict_score
        ax.set_title(f"{m}\nscore {score:.3f}", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=fig.axes, shrink=0.8,
                     label="same-state similarity" if a.conflict is not None else "noise-corrected cosine")
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", metadata={"Software": None})


def plot_dendrogram(a: Analysis, path: str) -> None:
    from scipy.cluster.hierarchy import dendrogram

    fig = _canvas(5, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    Z = a.grouping.info.get("linkage")
    if Z is not None:
        dendrogram(Z, labels=a.languages, ax=ax, color_threshold=0)
        if a.settings.get("distance_threshold") is not None:
            ax.axhline(a.settings["distance_threshold"], ls="--", c="gray")
        ax.set_ylabel("1 - noise-corrected cosine (average linkage)")
    else:  # no linkage, so no distance axis to label
        ax.text(0.5, 0.5, "a single language" if len(a.languages) == 1 else
                "groups from conflict edges\n(no dendrogram; see report.md)", ha="center", transform=ax.transAxes)
    ax.set_title("groups: " + _groups_str(a.grouping.partition), fontsize=8)
    _save(fig, path)


def plot_layer_profile(a: Analysis, path: str) -> None:
    series: Dict[str, List[tuple]] = {}
    # every tracked module: those with summed metrics, or (same-state records alone) every block
    for order, m in enumerate(a.metrics or a.conflict.blocks):
        parsed = parse_layer(m)
        key, x = parsed if parsed else ("(no layer index: module order)", order)
        score = a.conflict.estimates[m].score if a.conflict is not None else a.metrics[m].conflict_score
        series.setdefault(key, []).append((x, score, m))
    fig = _canvas(6.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    for key, pts in sorted(series.items()):
        pts.sort()
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        ax.plot(xs, ys, marker="o", label=key)
        for x, y, m in pts:
            if m in a.split_modules:
                ax.scatter([x], [y], s=120, facecolors="none", edgecolors="red", zorder=3)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer index")
    ax.set_ylabel("conflict score")
    ax.set_title("per-layer conflict (red circle: split)", fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_stability(a: Analysis, path: str, max_bars: int = 8) -> None:
    g = a.grouping
    fig = _canvas(6.5, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    freqs = g.frequencies[:max_bars]
    if freqs:
        labels = [_groups_str(p) for p, _ in freqs]
        colors = ["tab:red" if p == g.partition else "tab:gray" for p, _ in freqs]
        ax.barh(range(len(freqs)), [f for _, f in freqs], color=colors)
        ax.set_yticks(range(len(freqs)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
    ax.set_xlabel(f"frequency over {g.resamples} bucket-bootstrap resamples (red: chosen)")
    _save(fig, path)


def write_outputs(a: Analysis, out_dir: str) -> Dict[str, str]:
    """Write plan.json, report.md and the figures into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"plan": os.path.join(out_dir, "plan.json"), "report": os.path.join(out_dir, "report.md")}
    figures = {"similarity": "similarity.png", "dendrogram": "dendrogram.png",
               "layer_profile": "layer_profile.png", "stability": "stability.png"}
    plan = a.plan().validate(languages=a.languages)
    plan.save(paths["plan"])
    plot_similarity(a, os.path.join(out_dir, figures["similarity"]))
    plot_dendrogram(a, os.path.join(out_dir, figures["dendrogram"]))
    plot_layer_profile(a, os.path.join(out_dir, figures["layer_profile"]))
    plot_stability(a, os.path.join(out_dir, figures["stability"]))
    md = report_markdown(a, list(figures.values()))
    with atomic_write(paths["report"]) as f:
        f.write(md)
    paths.update({k: os.path.join(out_dir, v) for k, v in figures.items()})
    return paths
