"""The GDPS analysis (same-state records -> conflict by block -> groups -> shared ratio -> plan) and its report.

The decision comes from the same-state probe records alone (``same_state.py``, ``conflict.py``):
blocks are ranked by conflict, the split blocks are the explicit ``modules`` if given, else the top
candidate (``select="top1"``: the paper splits a single FFN) or the top ``top_k`` (``select="topk"``);
languages that conflict there go into different groups (or ``n_groups`` are forced by clustering
their similarity). Statistics that also keep the summed statistics get the summed-statistics
diagnostic (``summed_diagnostics.py``) in a report section of its own; it decides nothing.

``analyze`` runs the analysis; ``write_outputs`` writes ``plan.json``, ``report.md`` and the PNG
plots (``similarity.png``, ``dendrogram.png``, ``layer_profile.png``, ``stability.png``). Figures
use matplotlib's Agg canvas directly (no pyplot, no global backend switch).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional, Sequence

import numpy as np

from fairseq_gdps.gdps import conflict as C
from fairseq_gdps.gdps import grouping as G
from fairseq_gdps.gdps import summed_diagnostics as SD
from fairseq_gdps.gdps.plan import Plan
from fairseq_gdps.atomic import atomic_write, file_sha256

LAYER_RE = re.compile(r"^(?P<stack>.+?)\.(?P<layer>\d+)\.(?P<rest>.+)$")

# the estimator that decides, named in the plan's provenance and printed by gdps-analyze
ESTIMATOR = "same-state"

RECORD_AGAIN = ("record the statistics again with this version's stage 1 (fairseq-train --task speech_to_text_gdps "
                "... --gdps-probe-interval N --gdps-stats FILE; add --gdps-summed-statistics to get the "
                "summed-statistics diagnostic as well)")


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
    conflict: C.ConflictAnalysis        # what decides
    ranking: List[str]                  # candidate blocks by conflict, then the reference blocks
    split_modules: List[str]
    grouping: G.GroupingResult
    ratio: float
    ratio_raw: float
    ratio_rule: str                     # "conflict" (groups from conflict edges: --conflict-shared-ratio) or "similarity"
    ratio_similarity_rule: float        # what the similarity rule gives (= ratio unless conflict groups)
    settings: dict
    stats_info: dict
    notes: List[str] = field(default_factory=list)
    summed: Optional[SD.SummedDiagnostic] = None   # the summed-statistics diagnostic, where computed
    estimator: ClassVar[str] = ESTIMATOR

    def _scores(self) -> Dict[str, dict]:
        ca = self.conflict
        out = {}
        for rank, b in enumerate(self.ranking, 1):
            e = ca.estimates[b]
            out[b] = {"rank": rank, "same_state_conflict": e.score, "same_state_conflict_interval": list(e.score_interval),
                      "same_state_rank": rank if b in ca.candidates else None,
                      "reference_block": b in ca.reference_blocks,
                      "same_state_rho_mean": e.rho_mean,
                      "identifiable": e.identifiability_state}
            if e.identifiability is not None:
                out[b]["identifiability"] = e.identifiability
        return out

    def plan(self) -> Plan:
        g = self.grouping
        ca = self.conflict
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
            "ratio": {"mean_cross_group_similarity": self.ratio_raw, "quantised": self.ratio,
                      "rule": self.ratio_rule, "similarity_rule": self.ratio_similarity_rule},
            "estimator": self.estimator,
            "same_state": {
                "probes": ca.probes, "batches": ca.batches, "window": list(ca.window), "probed_updates": list(ca.updates),
                "reference_blocks": ca.reference_blocks, "candidates": ca.candidates,
                "separation": ca.separation, "resamples": ca.resamples, "interval_level": ca.level,
                "distinct_level": ca.distinct_level, "unit_level": ca.unit_level, "rho_beyond_one": ca.beyond_one,
                "rho": {b: ca.estimates[b].rho for b in ca.blocks},
                "languages": ca.languages,
            },
        }
        return Plan(modules=self.split_modules, groups=g.groups, shared_ratio=self.ratio, scores=self._scores(),
                    provenance=provenance)


def analyze(stats, stats_path: str = "", *, modules: Optional[Sequence[str]] = None, select: str = "top1",
            top_k: int = 3, n_groups: Optional[int] = None, window_start: Optional[int] = None,
            window_end: Optional[int] = None, reference: str = "encoder.*", conflict_tau: float = 0.1,
            min_reference_agreement: float = 0.5, identifiability_margin: float = 0.05,
            interval_level: float = 0.9, distinct_level: Optional[float] = None, ratio_min: float = 0.25,
            ratio_max: float = 0.75, ratio_step: float = 0.125, conflict_shared_ratio: Optional[float] = 0.0,
            resamples: int = 1000, seed: int = 0,
            summed_diagnostic: Optional[SD.Settings] = SD.Settings()) -> Analysis:
    """The decision from the same-state records of ``stats`` (read from ``stats_path``, named in
    errors and the plan). ``summed_diagnostic``: the settings of the summed-statistics diagnostic,
    computed where the statistics keep the summed statistics (None: never)."""
    where = stats_path or "statistics"
    if select not in ("top1", "topk"):
        raise ValueError(f"select must be 'top1' or 'topk', got {select!r}")
    if top_k < 1:
        raise ValueError("top_k must be >= 1")
    if stats.same_state is None:
        raise ValueError(f"{where}: these gradient statistics hold no same-state probe records, which gdps-analyze "
                         f"decides from (recorded by an older stage 1, or without the probe): {RECORD_AGAIN}")
    if modules:
        unknown = [m for m in modules if m not in stats.module_names]
        if unknown:
            raise ValueError(f"modules {unknown} are not in the statistics (recorded: {', '.join(stats.module_names)})")
    notes: List[str] = []
    # a language's steps are the probes with its tokens
    steps_per_language = stats.same_state.probes_per_language()
    languages = [l for l in stats.languages if steps_per_language.get(l, 0) > 0]
    dropped = [l for l in stats.languages if l not in languages]
    if dropped:
        notes.append(f"languages without any recorded step left out: {dropped}")
    if not languages:
        raise ValueError(f"{where}: no language has any recorded step")
    skipped = {l: c for l, c in stats.skipped_nonfinite.items() if c}
    if skipped:
        notes.append(f"steps skipped for non-finite gradients: {skipped}")
    probes = len(stats.same_state.arrays(window_start, window_end)[0])
    if probes < 2:
        raise ValueError(f"{where}: {probes} same-state probe(s) in the window [{window_start}, {window_end}), at "
                         f"least 2 needed: widen the window (--window-start/--window-end) or probe more updates")
    ca = C.analyse(stats.same_state, window_start, window_end, reference=reference, resamples=resamples, seed=seed,
                   level=interval_level, identifiability_margin=identifiability_margin, languages=languages,
                   distinct_level=distinct_level)
    tail = ca.resamples * (1 - ca.distinct_level) / 2
    if 0 < tail < 5:
        notes.append(f"the distinctness intervals (level {ca.distinct_level:.3g}) rest on {tail:.1f} bootstrap "
                     f"replicates in each tail of {ca.resamples}: raise --resamples to about "
                     f"{int(np.ceil(20 / (1 - ca.distinct_level)))} for tails of 10")
    split_modules, grouping, rho = _same_state_decision(ca, modules, select, top_k, n_groups, conflict_tau,
                                                        min_reference_agreement, notes)
    rule_ratio, ratio_raw = G.shared_ratio(rho, grouping.partition, languages, ratio_min, ratio_max, ratio_step)
    ratio = rule_ratio
    from_conflict = grouping.source == "conflict" and len(grouping.partition) > 1
    if from_conflict and conflict_shared_ratio is not None:
        # the groups were put apart because their gradients conflict in this very block: units
        # they shared would carry the conflict again (docs/benchmarks.md measures both rules)
        ratio, ratio_rule = float(conflict_shared_ratio), "conflict"
    else:
        ratio_rule = "similarity"
    if len(grouping.partition) == 1:
        notes.append("a single group: every language uses the same private block, so the split changes "
                     "nothing but capacity layout; consider --groups K to force a split")
    settings = {"modules": list(modules) if modules else None, "select": select, "top_k": top_k,
                "groups": n_groups, "ratio_min": ratio_min, "ratio_max": ratio_max, "ratio_step": ratio_step,
                "resamples": resamples, "seed": seed, "window_start": window_start, "window_end": window_end,
                "reference_blocks": reference, "conflict_tau": conflict_tau,
                "min_reference_agreement": min_reference_agreement,
                "identifiability_margin": identifiability_margin,
                "interval_level": interval_level, "distinct_level": distinct_level,
                "conflict_shared_ratio": conflict_shared_ratio}
    stats_info = {"languages": list(stats.languages), "steps": stats.num_steps,
                  "steps_per_language": steps_per_language,
                  "skipped_nonfinite": stats.skipped_nonfinite, "model_signature": stats.model_signature,
                  "summed": stats.summed, "sketch_dim": stats.sketch_dim, "subspace_dim": stats.subspace_dim,
                  "num_buckets": stats.num_buckets, "aux_dim": stats.aux_dim, "seed": stats.seed,
                  "modules": len(stats.module_names)}
    summed = SD.diagnose(stats, languages, summed_diagnostic) if stats.summed and summed_diagnostic else None
    sha = file_sha256(stats_path) if stats_path and os.path.isfile(stats_path) else ""
    return Analysis(stats_path=str(stats_path), stats_sha256=sha, languages=languages, conflict=ca,
                    ranking=ca.candidates + ca.reference_blocks, split_modules=split_modules, grouping=grouping,
                    ratio=ratio, ratio_raw=ratio_raw, ratio_rule=ratio_rule, ratio_similarity_rule=rule_ratio,
                    settings=settings, stats_info=stats_info, notes=notes, summed=summed)


def _same_state_decision(ca: C.ConflictAnalysis, modules, select, top_k, n_groups, tau, min_reference, notes):
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
        partition, info = G.cluster(G.to_distance(rho), langs, n_groups=n_groups)
        cg = None
    elif unidentified:
        partition = (tuple(langs),)
        info = {"rule": (f"languages are not told apart from speakers in {', '.join(unidentified)} (within-language "
                         "cross-speaker agreement below cross-language agreement plus the margin, over the whole "
                         "interval): no split along languages")}
        notes.append(info["rule"])
        cg = None
    else:
        cg = C.group(ca, split, tau=tau, min_reference=min_reference)
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
    info = a.stats_info
    if a.summed is not None:
        summed = (f"- summed statistics: sketch_dim {info['sketch_dim']}, subspace_dim {info['subspace_dim']}, "
                  f"{info['num_buckets']} buckets (the diagnostic below; it does not decide)")
    elif info["summed"]:
        summed = "- summed statistics: recorded; their diagnostic was not computed"
    else:
        summed = "- summed statistics: not recorded (stage 1 without --gdps-summed-statistics), so no diagnostic"
    out = ["# GDPS gradient analysis", ""]
    out += [f"- statistics: `{a.stats_path}` (sha256 `{a.stats_sha256[:16]}`); model signature "
            f"`{info['model_signature']}`",
            f"- languages: {', '.join(langs)}; recorded steps: {info['steps']}; steps per language: "
            + ", ".join(f"{l} {n}" for l, n in info["steps_per_language"].items()),
            summed, ""]
    out += ["## Decision", "",
            f"- split modules: {', '.join(f'`{m}`' for m in a.split_modules)}",
            f"- groups: {_groups_str(a.grouping.partition)} ({a.grouping.info.get('rule')})",
            f"- shared ratio: **{a.ratio:g}**", ""]
    out += _same_state_markdown(a)
    g = a.grouping
    how = ("average linkage of this distance." if g.info.get("linkage") is not None else
           "the groups come from conflict edges (see above), not from clustering this distance; it is shown "
           "for reference.")
    out += ["## Language grouping", "",
            f"Distance = 1 - same-state similarity, averaged over {', '.join(f'`{m}`' for m in g.modules)}; {how}", ""]
    out += _matrix_md(g.distance, langs) + [""]
    out += [f"- rule: {g.info.get('rule')}", f"- chosen: {_groups_str(g.partition)}", ""]
    if g.resamples:
        out += [f"Stability over {g.resamples} bootstrap resamples of the probed batches: the chosen grouping came "
                f"out in **{100 * g.chosen_frequency:.1f}%**.", "",
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
                f"same-state similarity between languages of different groups {_f(a.ratio_raw)}, clipped to "
                f"[{st['ratio_min']:g}, {st['ratio_max']:g}] and quantised to steps of {st['ratio_step']:g}).", ""]
    else:
        out += [f"Mean same-state similarity between languages of different groups on the split module(s): "
                f"{_f(a.ratio_raw)}. Clipped to [{st['ratio_min']:g}, {st['ratio_max']:g}] and quantised to steps "
                f"of {st['ratio_step']:g}: **{a.ratio:g}** of each split module stays shared, the rest becomes one "
                "private block per group. Groups that still agree keep more shared capacity.", ""]
    if a.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in a.notes] + [""]
    if a.summed is not None:
        out += _summed_markdown(a.summed, a.split_modules)
    if figures:
        out += ["## Figures", ""] + [f"![{os.path.splitext(f)[0]}]({f})" for f in figures] + [""]
    return "\n".join(out)


def _summed_markdown(d: SD.SummedDiagnostic, split_modules: Sequence[str]) -> List[str]:
    """The summed-statistics diagnostic's section: its ranking and the similarities of the split
    and its top-ranked modules."""
    langs = d.languages
    clipped = d.clipped
    out = ["## Summed-statistics diagnostic (does not decide)", "",
           "From the summed statistics (stage 1 with `--gdps-summed-statistics`). Their cross-language terms are "
           "taken at one model state and their self terms across updates, at different states, so while the model "
           "trains the noise-corrected cosines below can exceed +-1 and do not measure conflict. Nothing in this "
           "section enters the decision above.", "",
           f"- noise-corrected cosines beyond +-1: {clipped['clipped']} of {clipped['pairs']} language pairs over all "
           "modules" + (" (**most of them: the summed steps are not independent draws around one expected gradient, "
                        "and the divergences and this ranking mean nothing**)" if d.mostly_clipped else ""), "",
           "Summed conflict score = divergence x ((1 - w) + w x (1 - subspace alignment)), "
           f"w = {d.settings.alignment_weight:g}; divergence = mean over pairs of (1 - noise-corrected cosine) / 2.", "",
           "| rank | module | summed conflict score | divergence | neg. pairs | step conflict (Gauss.) | corr. cos mean | "
           "corr. cos min | raw cos mean | self-sim mean | subspace align. | CCA |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r, m in enumerate(d.ranking, 1):
        s = d.metrics[m].scores()
        out.append(f"| {r} | `{m}` | {_f(s['conflict_score'])} | {_f(s['divergence'])} | {_f(s['conflict_rate'], 2)} | "
                   f"{_f(s['step_conflict_rate'])} | {_f(s['corrected_cos_mean'])} | {_f(s['corrected_cos_min'])} | "
                   f"{_f(s['raw_cos_mean'])} | {_f(s['self_cos_mean'])} | {_f(s['subspace_alignment'])} | "
                   f"{_f(s['cca_mean'])} |")
    out.append("")
    for m in dict.fromkeys(list(split_modules) + d.ranking[:3]):
        mm = d.metrics[m]
        out += [f"### `{m}` (summed statistics)", "", "Noise-corrected cosine of mean gradients:", ""]
        out += _matrix_md(mm.corrected_cos, langs) + [""]
        out += ["Raw cosine of mean gradients:", ""] + _matrix_md(mm.raw_cos, langs) + [""]
        out += ["Self-similarity (share of gradient energy consistent across steps): "
                + ", ".join(f"{l} {_f(v)}" for l, v in zip(langs, mm.self_cos)), ""]
        if np.isfinite(mm.step_conflict_prob).any():
            out += ["Per-step P(negative inner product), Gaussian estimate in the projected space:", ""]
            out += _matrix_md(mm.step_conflict_prob, langs) + [""]
    if d.notes:
        out += ["Notes on the summed statistics:", ""] + [f"- {n}" for n in d.notes] + [""]
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
                   f"[{_f(e.score_interval[0])}, {_f(e.score_interval[1])}] | {_f(e.rho_mean)} | "
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
        mat = a.conflict.estimates[m].rho
        im = ax.imshow(mat, vmin=-1, vmax=1, cmap="RdBu")
        ax.set_xticks(range(L), a.languages, rotation=45)
        ax.set_yticks(range(L), a.languages)
        for i in range(L):
            for j in range(L):
                if np.isfinite(mat[i, j]):
                    ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7)
        score = a.conflict.estimates[m].score
        ax.set_title(f"{m}\nscore {score:.3f}", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=fig.axes, shrink=0.8, label="same-state similarity")
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", metadata={"Software": None})


def plot_dendrogram(a: Analysis, path: str) -> None:
    from scipy.cluster.hierarchy import dendrogram

    fig = _canvas(5, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    Z = a.grouping.info.get("linkage")
    if Z is not None:
        dendrogram(Z, labels=a.languages, ax=ax, color_threshold=0)
        ax.set_ylabel("1 - same-state similarity (average linkage)")
    else:  # no linkage, so no distance axis to label
        ax.text(0.5, 0.5, "a single language" if len(a.languages) == 1 else
                "groups from conflict edges\n(no dendrogram; see report.md)", ha="center", transform=ax.transAxes)
    ax.set_title("groups: " + _groups_str(a.grouping.partition), fontsize=8)
    _save(fig, path)


def plot_layer_profile(a: Analysis, path: str) -> None:
    series: Dict[str, List[tuple]] = {}
    for order, m in enumerate(a.conflict.blocks):
        parsed = parse_layer(m)
        key, x = parsed if parsed else ("(no layer index: module order)", order)
        score = a.conflict.estimates[m].score
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
    ax.set_xlabel(f"frequency over {g.resamples} bootstrap resamples of the probed batches (red: chosen)")
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
