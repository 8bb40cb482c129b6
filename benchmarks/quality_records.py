"""The quality benchmark's records and the report made from them.

Every finished run of ``benchmarks/quality.py`` becomes one small JSON record in the repository,
``benchmarks/results/quality/<setting>/<condition>/seed<S>/<system>.json``: the run's settings,
software versions and machine, its scores per language, its hypotheses keyed by utterance id (and
their hash), the dev curve, the parameter count, the split it trained with and, for GDPS, the plan
with its provenance, and the wall time. Each condition's test references sit once beside them
(``<condition>/references.json``). The report is generated from these files alone, so it can be
re-aggregated, extended by later sittings or re-scored on another machine without any run folder.
The shared-ratio check's table (``quality.py --ratio-validation``) is made from such records too.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from statistics import mean, stdev
from typing import Optional

from benchmarks.common import write_json

RECORD_FORMAT = 1
CONFLICT_LANGUAGE, CONFLICT_BASE = "xx", "et"
# conditions with a planted conflict language (xx spoken by et's speakers) and what it permutes
PLANTED_CONDITIONS = {
    "conflict": "`xx` is Estonian spoken by Estonian's own speakers with its numbers and units permuted: it differs "
                "from `et` in meaning only. The right grouping isolates it.",
    "conflict_units": "`xx` is Estonian spoken by Estonian's own speakers with only its units permuted (its numbers "
                      "mean what et's mean): a partial meaning conflict. The right grouping isolates it.",
}
SPLIT_SYSTEMS = ("gdps", "full_split", "full_split_matched", "random_groups", "param_diff", "gdps_similarity_ratio", "oracle")
BASELINES = ("baseline", "tagged")
# Controls with exactly GDPS's parameter count: GDPS is compared with each directly, since a split
# that wins only by being larger says nothing for the analysis.
EQUAL_SIZE_CONTROLS = ("full_split_matched", "random_groups")

# What each system knows of an utterance's language (the report prints it per condition).
LANGUAGE_INFORMATION = {
    "baseline": "none: stock `speech_to_text` + `s2t_transformer`, the audio only",
    "tagged": "a learned vector per language added to the encoder input (`--gdps-lang-embedding`), no split",
    "gdps": "the language embedding, and the plan's FFN(s) routed by language group",
    "full_split": "the language embedding, and GDPS's FFN(s) routed by language (a block per language, no shared units)",
    "full_split_matched": "the language embedding, and GDPS's FFN(s) routed by language at the plan's size (a narrower "
                          "private block per language, the rest shared)",
    "random_groups": "the language embedding, and GDPS's FFN(s) and ratio routed by random groups of the plan's sizes",
    "param_diff": "the language embedding, and GDPS's FFN(s) copied whole per cluster (two clusters)",
    "gdps_similarity_ratio": "the language embedding, and GDPS's FFN(s) and groups with the similarity rule's shared ratio",
    "oracle": "the language embedding, and the planted split: xx alone at every decoder FFN, nothing shared "
              "(what a split is worth where the answer is known)",
    "bilingual": "one model per language",
}

# The learned regime: the demo corpus' template plateau (the model produces the sentence frames,
# not their numbers and units) lies below this dev accuracy (docs/benchmarks.md); past it, the
# content is being learned. Checked on each seed's stock baseline, on the languages without a planted
# conflict (in the conflict condition et and xx share their audio and cannot both be right).
LEARNED_CRITERION = {"min_average_bleu": 35.0, "min_final_dev_accuracy": 75.0}

# Targets the project aims for, checked and printed, never assumed.
_PLANTED_TARGETS = {"gdps_minus_tagged_average": 1.0, "gdps_minus_tagged_xx": 1.0, "other_language_floor": -0.5,
                    "gdps_minus_equal_size_control": 0.0, "gdps_share_of_oracle_gain": 0.7}
TARGETS = {"conflict": _PLANTED_TARGETS, "conflict_units": _PLANTED_TARGETS,
           "natural": {"gdps_minus_tagged_average": 0.0, "other_language_floor": -0.5,
                       "gdps_minus_equal_size_control": 0.0}}

logger = logging.getLogger("quality")


class RecordError(ValueError):
    """A record that does not belong to this benchmark's setting, or is damaged (names the file)."""


# ---------------------------------------------------------------------------------------------
# paths and writing
# ---------------------------------------------------------------------------------------------

def record_path(root: Path, condition: str, seed: int, system: str) -> Path:
    return root / condition / f"seed{seed}" / f"{system}.json"


def references_path(root: Path, condition: str) -> Path:
    return root / condition / "references.json"


def sha256_of(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def test_references(data: Path) -> dict[str, dict[str, str]]:
    """{language: {utterance id: English reference}} from the per-language test manifests."""
    from fairseq_gdps.data.generate_output import read_manifest

    refs = {}
    for manifest in sorted(data.glob("test_*.tsv")):
        refs[manifest.stem[len("test_"):]] = {row.id: row.tgt_text for row in read_manifest(manifest)}
    if not refs:
        raise FileNotFoundError(f"{data}: no per-language test manifests (test_<lang>.tsv)")
    return refs


def write_references(root: Path, condition: str, data: Path, corpus_settings: Optional[dict]) -> str:
    """The condition's references (once); refuses a data folder whose test set differs from the
    one the condition's records were scored on. Returns their hash."""
    refs = test_references(data)
    digest = sha256_of(refs)
    path = references_path(root, condition)
    if path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if recorded["sha256"] != digest:
            raise RecordError(f"{path}: the recorded test references differ from those of {data} "
                              "(another corpus): use the data the records were made on, or another --results folder")
        return digest
    write_json(path, {"format": RECORD_FORMAT, "condition": condition, "sha256": digest,
                      "corpus_settings": corpus_settings, "references": refs})
    return digest


def hypotheses_of(data: Path, decode_dir: Path) -> dict[str, dict[str, str]]:
    """{language: {utterance id: hypothesis}} of a run's fairseq-generate outputs."""
    from fairseq_gdps.cli.score import collect_rows

    return {lang: {row.id: hyp for row, hyp in rows} for lang, rows in collect_rows(data, decode_dir).items()}


def make_record(*, setting_name: str, run_setting: dict, condition: str, seed: int, system: str, scores: dict,
                hypotheses: dict, references_sha256: str, dev_curve: list, params: Optional[int],
                split: Optional[dict], plan: Optional[dict], wall_seconds: Optional[float], versions: dict,
                machine: dict, threads: int, notes: Optional[str] = None) -> dict:
    return {"format": RECORD_FORMAT, "benchmark": "quality", "setting": setting_name, "run_setting": run_setting,
            "condition": condition, "seed": seed, "system": system,
            "language_information": LANGUAGE_INFORMATION[system],
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_seconds": wall_seconds,
            "machine": machine, "threads": threads, "versions": versions,
            "scores": {lang: {m: s[m] for m in ("bleu", "chrf", "ter", "n") if m in s}
                       for lang, s in scores["languages"].items()},
            "average": {m: scores["average"][m] for m in ("bleu", "chrf", "ter")},
            "references_sha256": references_sha256,
            "hypotheses_sha256": sha256_of(hypotheses), "hypotheses": hypotheses,
            "dev_curve": dev_curve, "params": params, "split": split, "plan": plan, "notes": notes}


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------

def load_records(root: Path, setting_name: str, run_setting: dict) -> tuple[list[dict], dict[str, dict]]:
    """Every record under ``root`` and the conditions' references; a record of another setting,
    format or test set is an error that names its file."""
    records, references = [], {}
    for path in sorted(root.glob("*/references.json")):
        references[path.parent.name] = json.loads(path.read_text(encoding="utf-8"))
    for path in sorted(root.glob("*/seed*/*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}: not a readable record ({e})") from e
        if record.get("format") != RECORD_FORMAT or record.get("benchmark") != "quality":
            raise RecordError(f"{path}: not a quality record of format {RECORD_FORMAT}")
        if record["setting"] != setting_name or record["run_setting"] != run_setting:
            raise RecordError(f"{path}: made with setting {record['setting']} {record['run_setting']}, "
                              f"not {setting_name} {run_setting}")
        refs = references.get(record["condition"])
        if refs is None or refs["sha256"] != record["references_sha256"]:
            raise RecordError(f"{path}: scored on other test references than {references_path(root, record['condition'])}")
        if sha256_of(record["hypotheses"]) != record["hypotheses_sha256"]:
            raise RecordError(f"{path}: its hypotheses do not match their recorded hash (edited by hand?)")
        record["path"] = str(path)
        records.append(record)
    return records, references


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------

def criterion_languages(condition: str, languages: list[str]) -> list[str]:
    if condition in PLANTED_CONDITIONS:
        return [l for l in languages if l not in (CONFLICT_LANGUAGE, CONFLICT_BASE)]
    return list(languages)


def learned_check(baseline: dict, criterion: dict) -> dict:
    """Whether a seed's stock baseline has learned the content (``criterion``: LEARNED_CRITERION)."""
    languages = criterion_languages(baseline["condition"], sorted(baseline["scores"]))
    average = mean(baseline["scores"][l]["bleu"] for l in languages)
    dev = [p for p in baseline["dev_curve"] if p.get("accuracy") is not None]
    accuracy = dev[-1]["accuracy"] if dev else None
    reasons = []
    if average < criterion["min_average_bleu"]:
        reasons.append(f"average BLEU {average:.1f} < {criterion['min_average_bleu']:.0f}")
    if accuracy is None or accuracy < criterion["min_final_dev_accuracy"]:
        reasons.append(f"final dev accuracy {accuracy if accuracy is None else round(accuracy, 1)} "
                       f"< {criterion['min_final_dev_accuracy']:.0f}")
    return {"languages": languages, "average_bleu": average, "final_dev_accuracy": accuracy,
            "passed": not reasons, "why_not": "; ".join(reasons)}


def mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return (math.nan, math.nan)
    return (mean(values), stdev(values) if len(values) > 1 else 0.0)


def paired_significance(reference: dict, a: dict, b: dict, n_samples: int, cache: dict) -> dict:
    """Paired bootstrap of system ``b`` against ``a`` (records of one condition and seed), per
    language and pooled, from their recorded hypotheses; ``cache`` keeps results by the two
    hypotheses' hashes, so a re-aggregation recomputes only new pairs."""
    from fairseq_gdps.scoring.translation_scores import paired_bootstrap

    key = f"{a['hypotheses_sha256']}:{b['hypotheses_sha256']}:{n_samples}"
    if key in cache:
        return cache[key]
    refs = reference["references"]
    triples = {}
    for lang in sorted(refs):
        ids = sorted(refs[lang])
        for record in (a, b):
            if set(record["hypotheses"].get(lang, {})) != set(ids):
                raise RecordError(f"{record['path']}: its {lang} hypotheses cover other utterances than the references")
        triples[lang] = [(a["hypotheses"][lang][i], b["hypotheses"][lang][i], refs[lang][i]) for i in ids]
    triples["pooled"] = [t for lang in sorted(refs) for t in triples[lang]]
    out = {}
    for lang, t in triples.items():
        result = paired_bootstrap([x for x, _, _ in t], [y for _, y, _ in t], [r for _, _, r in t], n_samples=n_samples)
        out[lang] = {"delta": result["bleu"]["delta"], "p_value": result["bleu"]["p_value"]}
    cache[key] = out
    return out


def comparison_sentence(system: str, against: str, per_seed: list[dict]) -> str:
    """One generated sentence: in how many seeds ``system`` is above ``against`` on average BLEU,
    and how many of those are significant (paired bootstrap on the pooled test set)."""
    n = len(per_seed)
    if not n:
        return f"{system} vs {against}: no seed with both."
    above = sum(c["delta_average"] > 0 for c in per_seed)
    sig_above = sum(c["pooled_delta"] > 0 and c["pooled_p"] < 0.05 for c in per_seed)
    sig_below = sum(c["pooled_delta"] < 0 and c["pooled_p"] < 0.05 for c in per_seed)
    delta = mean(c["delta_average"] for c in per_seed)
    if sig_above == n:
        verdict = f"above in {n} of {n} seeds, p < 0.05 in every one"
    elif sig_below == n:
        verdict = f"below in {n} of {n} seeds, p < 0.05 in every one"
    elif sig_above == 0 and sig_below == 0:
        verdict = "no significant difference in any seed"
    else:
        verdict = f"significantly above in {sig_above}, below in {sig_below} of {n} seeds: no consistent difference"
    return (f"**{system}** vs **{against}**: {delta:+.1f} average BLEU (mean over {n} seed{'s' if n > 1 else ''}; "
            f"above in {above} of {n}); {verdict}" + (" (fewer than 3 seeds: a direction, not yet a finding)." if n < 3 else "."))


def aggregate(records: list[dict], references: dict, n_samples: int, cache: dict, criterion: dict) -> dict:
    """Per condition: the learned-regime check per seed, per-system means over the seeds that pass
    it, paired comparisons against both baselines, and the analysis' choices."""
    out = {}
    by_condition: dict[str, dict[int, dict[str, dict]]] = {}
    for r in records:
        by_condition.setdefault(r["condition"], {}).setdefault(r["seed"], {})[r["system"]] = r
    for condition, seeds in sorted(by_condition.items()):
        checks = {seed: learned_check(runs["baseline"], criterion) for seed, runs in seeds.items() if "baseline" in runs}
        passed = sorted(s for s, c in checks.items() if c["passed"])
        systems = sorted({sys for runs in seeds.values() for sys in runs}, key=_system_order)
        summary, comparisons = {}, {}
        for system in systems:
            runs = [seeds[s][system] for s in passed if system in seeds[s]]
            if not runs:
                continue
            languages = sorted(runs[0]["scores"])
            summary[system] = {
                "seeds": [r["seed"] for r in runs],
                "bleu": {l: mean_sd([r["scores"][l]["bleu"] for r in runs]) for l in languages},
                "chrf": {l: mean_sd([r["scores"][l]["chrf"] for r in runs]) for l in languages},
                "average_bleu": mean_sd([r["average"]["bleu"] for r in runs]),
                "average_chrf": mean_sd([r["average"]["chrf"] for r in runs]),
                "params": sorted({r["params"] for r in runs if r.get("params")}),
                "wall_seconds": mean_sd([r["wall_seconds"] for r in runs if r.get("wall_seconds")]),
            }
            # every system against the baselines, the tagged baseline against the stock one, and
            # GDPS against each control of its own size
            for against in BASELINES + (EQUAL_SIZE_CONTROLS if system == "gdps" else ()):
                if system == "baseline" or against == system:
                    continue
                per_seed = []
                for s in passed:
                    if system in seeds[s] and against in seeds[s]:
                        a, b = seeds[s][against], seeds[s][system]
                        sig = paired_significance(references[condition], a, b, n_samples, cache)
                        per_seed.append({"seed": s, "delta_average": b["average"]["bleu"] - a["average"]["bleu"],
                                         "delta_languages": {l: b["scores"][l]["bleu"] - a["scores"][l]["bleu"]
                                                             for l in b["scores"]},
                                         "pooled_delta": sig["pooled"]["delta"], "pooled_p": sig["pooled"]["p_value"],
                                         "languages_p": {l: v["p_value"] for l, v in sig.items() if l != "pooled"}})
                if per_seed:
                    comparisons[f"{system}|{against}"] = {"per_seed": per_seed,
                                                          "sentence": comparison_sentence(system, against, per_seed)}
        choices = {}
        for seed, runs in sorted(seeds.items()):
            if "gdps" in runs and runs["gdps"].get("plan"):
                plan = runs["gdps"]["plan"]
                choices[seed] = {"modules": plan["modules"], "groups": plan["groups"],
                                 "shared_ratio": plan["shared_ratio"],
                                 "decision": _decision_summary(plan),
                                 "conflict_language_alone": [CONFLICT_LANGUAGE] in plan["groups"],
                                 "conflict_pair_apart": not any({CONFLICT_BASE, CONFLICT_LANGUAGE} <= set(g)
                                                                for g in plan["groups"]),
                                 "conflict_pair_rho": _pair_rho(plan, CONFLICT_BASE, CONFLICT_LANGUAGE)}
        out[condition] = {"learned": checks, "passed_seeds": passed, "systems": summary, "comparisons": comparisons,
                          "choices": choices, "targets": _targets(condition, comparisons)}
    return out


def _system_order(system: str) -> int:
    order = ("baseline", "tagged", "gdps", "oracle", "full_split", "full_split_matched", "random_groups", "param_diff",
             "gdps_similarity_ratio", "bilingual")
    return order.index(system) if system in order else len(order)


def _pair_rho(plan: dict, a: str, b: str) -> dict[str, float]:
    """The same-state agreement of languages ``a`` and ``b`` per block, from the plan's provenance
    (empty when the plan has no such languages or no same-state estimate)."""
    same_state = plan.get("provenance", {}).get("same_state") or {}
    languages = same_state.get("languages", [])
    if a not in languages or b not in languages:
        return {}
    i, j = languages.index(a), languages.index(b)
    return {block: matrix[i][j] for block, matrix in same_state.get("rho", {}).items()}


def _short_block(name: str) -> str:
    """decoder.layers.1.ffn -> dec1, encoder.transformer_layers.0.ffn -> enc0."""
    index = name.split(".")[-2]
    return ("dec" if name.startswith("decoder") else "enc" if name.startswith("encoder") else name) + index


def _decision_summary(plan: dict) -> str:
    """What the plan rests on, from its provenance: the probes and the top block's separation."""
    same_state = plan.get("provenance", {}).get("same_state")
    if not same_state:
        return ""
    text = f"{same_state['probes']} probes over updates {same_state['probed_updates'][0]}-{same_state['probed_updates'][1]}"
    sep = same_state.get("separation") or {}
    if sep.get("top"):
        lo, hi = sep["interval"]
        text += (f"; top block {sep['top']} {'separated' if sep['separated'] else 'not separated'} from {sep['next']} "
                 f"(score difference {sep['difference']:+.3f}, interval {lo:+.3f}..{hi:+.3f})")
    return text


def _targets(condition: str, comparisons: dict) -> list[str]:
    """The project's targets for this condition, each said met or not from the numbers."""
    wanted = TARGETS.get(condition)
    c = comparisons.get("gdps|tagged")
    if not wanted or not c:
        return []
    n = len(c["per_seed"])
    avg = mean(p["delta_average"] for p in c["per_seed"])
    lines = [f"GDPS - tagged baseline, average BLEU: {avg:+.2f} (target >= {wanted['gdps_minus_tagged_average']:+.1f}): "
             f"{'met' if avg >= wanted['gdps_minus_tagged_average'] else 'NOT met'} ({n} seed{'s' if n > 1 else ''})"]
    if "gdps_minus_tagged_xx" in wanted:
        xx = mean(p["delta_languages"].get(CONFLICT_LANGUAGE, math.nan) for p in c["per_seed"])
        lines.append(f"GDPS - tagged baseline on {CONFLICT_LANGUAGE}: {xx:+.2f} (target >= "
                     f"{wanted['gdps_minus_tagged_xx']:+.1f}): {'met' if xx >= wanted['gdps_minus_tagged_xx'] else 'NOT met'}")
    if "other_language_floor" in wanted:
        others = {l: mean(p["delta_languages"][l] for p in c["per_seed"])
                  for l in c["per_seed"][0]["delta_languages"] if l != CONFLICT_LANGUAGE}
        worst = min(others, key=others.get)
        lines.append(f"Lowest {'other ' if condition in PLANTED_CONDITIONS else ''}language against the tagged baseline: {worst} "
                     f"{others[worst]:+.2f} (target >= {wanted['other_language_floor']:+.1f}): "
                     f"{'met' if others[worst] >= wanted['other_language_floor'] else 'NOT met'}")
    oracle = comparisons.get("oracle|tagged")
    if "gdps_share_of_oracle_gain" in wanted and oracle:
        # per seed with both, GDPS's gain over the tagged baseline as a share of the oracle's
        gains = {p["seed"]: p["delta_average"] for p in c["per_seed"]}
        pairs = [(gains[p["seed"]], p["delta_average"]) for p in oracle["per_seed"] if p["seed"] in gains]
        g, o = mean(a for a, _ in pairs), mean(b for _, b in pairs)
        share = g / o if o > 0 else math.nan
        lines.append(f"GDPS's gain over the tagged baseline as a share of the oracle split's: {g:+.2f} of {o:+.2f} = "
                     f"{share:.0%} (target >= {wanted['gdps_share_of_oracle_gain']:.0%}, {len(pairs)} seeds): "
                     + ("met" if share >= wanted["gdps_share_of_oracle_gain"] else
                        "NOT met" if o > 0 else "the oracle gains nothing here"))
    floor = wanted.get("gdps_minus_equal_size_control")
    for control in EQUAL_SIZE_CONTROLS if floor is not None else ():
        e = comparisons.get(f"gdps|{control}")
        if e:
            d = mean(p["delta_average"] for p in e["per_seed"])
            lines.append(f"GDPS - {control} (same size), average BLEU: {d:+.2f} (target >= {floor:+.1f}): "
                         f"{'met' if d >= floor else 'NOT met'} ({len(e['per_seed'])} seeds)")
    return lines


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------

def missing_summary(missing: list[str]) -> str:
    """``natural/seed1/gdps, natural/seed1/tagged, ...`` as ``natural seed 1: gdps, tagged; ...``."""
    by_run: dict[tuple[str, str], list[str]] = {}
    for name in missing:
        condition, seed, system = name.split("/")
        by_run.setdefault((condition, seed[len("seed"):]), []).append(system)
    return "; ".join(f"{c} seed {s}: {', '.join(systems)}" for (c, s), systems in by_run.items())


def _pm(ms: tuple[float, float], n: int) -> str:
    if ms[0] != ms[0]:
        return "-"
    return f"{ms[0]:.1f}" if n < 2 else f"{ms[0]:.1f} ± {ms[1]:.1f}"


def _params(counts: list[int]) -> str:
    """Parameter count over seeds: one number, or the range when seeds chose different splits."""
    if not counts:
        return "-"
    low, high = min(counts), max(counts)
    return f"{low / 1e6:.2f}M" if low == high else f"{low / 1e6:.2f}-{high / 1e6:.2f}M"


def display_groups(groups: list[list[str]]) -> str:
    return " / ".join("{" + ", ".join(g) + "}" for g in groups)


def to_markdown(results: dict, meta: dict) -> str:
    s = meta["run_setting"]
    lines = [f"<!-- generated by benchmarks/quality.py from the records in {meta['records_dir']}; do not edit -->", "",
             f"Setting `{meta['setting']}`: {s['max_update']} updates per system; GDPS's stage 1 (probe every "
             f"{s['probe_interval']} updates) is the first {s['stage1']} updates of the tagged baseline's run, "
             f"stage 2 the remaining {s['max_update'] - s['stage1']}; seeds {meta['seeds']}, conditions "
             f"{', '.join(meta['conditions'])}. **{meta['recorded']} of {meta['planned']} runs recorded**"
             + (f" — PARTIAL: still to run {missing_summary(meta['missing'])}"
                + (f" (about {meta['left_minutes']:.0f} min at 2 runs at a time)" if meta.get("left_minutes") else "")
                if meta["missing"] else "") + ".",
             "",
             f"Learned regime (checked per seed on the stock baseline): average test BLEU >= "
             f"{meta['criterion']['min_average_bleu']:.0f} on the languages without a planted conflict and a final "
             f"dev accuracy >= {meta['criterion']['min_final_dev_accuracy']:.0f}% (the template plateau is 67-70%). "
             "A seed that misses it is listed and left out of every mean below.", ""]
    for condition, cond in results.items():
        lines += [f"### Condition `{condition}`", ""]
        if condition in PLANTED_CONDITIONS:
            lines += [PLANTED_CONDITIONS[condition], ""]
        lines += ["| seed | baseline avg BLEU (criterion languages) | final dev accuracy | learned |", "|---|---:|---:|---|"]
        for seed, c in sorted(cond["learned"].items()):
            acc = "-" if c["final_dev_accuracy"] is None else f"{c['final_dev_accuracy']:.1f}%"
            lines.append(f"| {seed} | {c['average_bleu']:.1f} ({', '.join(c['languages'])}) | {acc} | "
                         + ("yes" if c["passed"] else f"**no**: {c['why_not']}") + " |")
        systems = cond["systems"]
        if not systems:
            lines += ["", "No seed has passed the learned-regime check yet.", ""]
            continue
        languages = sorted(next(iter(systems.values()))["bleu"])
        lines += ["", "Test BLEU, mean ± sd over the seeds that passed (sacrebleu):", "",
                  "| system | language information | seeds | " + " | ".join(languages) + " | avg BLEU | avg chrF | params |",
                  "|---|---|---|" + "---:|" * len(languages) + "---:|---:|---:|"]
        for system, x in systems.items():
            n = len(x["seeds"])
            lines.append(f"| {system} | {LANGUAGE_INFORMATION[system]} | {','.join(map(str, x['seeds']))} | "
                         + " | ".join(_pm(x["bleu"][l], n) for l in languages)
                         + f" | {_pm(x['average_bleu'], n)} | {_pm(x['average_chrf'], n)} | {_params(x['params'])} |")
        if cond["comparisons"]:
            lines += ["", "Against the baselines, and GDPS against the controls of its own size (paired bootstrap of "
                      "pooled test BLEU per seed, "
                      f"{meta['bootstrap']} resamples):", ""]
            lines += [f"- {c['sentence']}" for c in cond["comparisons"].values()]
        if any(key.endswith("|tagged") for key in cond["comparisons"]):
            lines += ["", "Per-language BLEU difference against the tagged baseline, mean over seeds "
                      "(`*`: p < 0.05 in every seed):", "",
                      "| system | " + " | ".join(languages) + " |", "|---|" + "---:|" * len(languages)]
            for key, c in cond["comparisons"].items():
                system, against = key.split("|")
                if against != "tagged":
                    continue
                cells = []
                for l in languages:
                    d = mean(p["delta_languages"][l] for p in c["per_seed"])
                    star = "*" if all(p["languages_p"][l] < 0.05 for p in c["per_seed"]) else ""
                    cells.append(f"{d:+.1f}{star}")
                lines.append(f"| {system} | " + " | ".join(cells) + " |")
        if cond["choices"]:
            lines += ["", "What GDPS's analysis chose:", ""]
            for seed, ch in cond["choices"].items():
                alone = ""
                if condition in PLANTED_CONDITIONS:
                    # what resolves the conflict is the pair in different groups (either one alone will do)
                    alone = (f"; `{CONFLICT_BASE}` and `{CONFLICT_LANGUAGE}` "
                             + ("apart" if ch["conflict_pair_apart"] else "in one group")
                             + (f" (`{CONFLICT_LANGUAGE}` alone)" if ch["conflict_language_alone"] else ""))
                what = (f"split {', '.join(ch['modules'])}, groups {display_groups(ch['groups'])}, shared ratio "
                        f"{ch['shared_ratio']}" if len(ch["groups"]) > 1 else
                        f"one group (no conflict measured): {', '.join(ch['modules'])} re-laid with no routing difference, "
                        "so GDPS is the tagged baseline computed in another order and their difference is numerical "
                        "run-to-run noise")
                rho = ""
                if ch.get("conflict_pair_rho"):
                    rho = (f"; same-state rho({CONFLICT_BASE}, {CONFLICT_LANGUAGE}): "
                           + ", ".join(f"{_short_block(b)} {v:.2f}" for b, v in ch["conflict_pair_rho"].items()))
                lines.append(f"- seed {seed}: {what}{alone}{rho}" + (f". {ch['decision']}" if ch["decision"] else ""))
        if cond["targets"]:
            lines += ["", "Targets:", ""] + [f"- {t}" for t in cond["targets"]]
        lines.append("")
    if meta.get("plot"):
        lines += [f"![dev accuracy versus updates]({meta['plot']})", ""]
    return "\n".join(lines)


def plot_learning_curves(records: list[dict], path: Path) -> None:
    """Dev accuracy against updates, mean over seeds per system and condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = sorted({r["condition"] for r in records})
    fig, axes = plt.subplots(1, max(1, len(conditions)), figsize=(6 * max(1, len(conditions)), 4), squeeze=False)
    for ax, condition in zip(axes[0], conditions):
        systems = sorted({r["system"] for r in records if r["condition"] == condition}, key=_system_order)
        for system in systems:
            curves = [{p["num_updates"]: p["accuracy"] for p in r["dev_curve"] if p.get("accuracy") is not None}
                      for r in records if r["condition"] == condition and r["system"] == system]
            curves = [c for c in curves if c]
            if not curves:
                continue
            common = sorted(set.intersection(*(set(c) for c in curves)))
            ax.plot(common, [mean(c[u] for c in curves) for u in common], marker=".",
                    label=f"{system} ({len(curves)} seed{'s' if len(curves) > 1 else ''})")
        ax.set_title(f"dev accuracy, {condition} corpus")
        ax.set_xlabel("updates")
        ax.set_ylabel("dev token accuracy (%)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# the shared-ratio check (quality.py --ratio-validation)
# ---------------------------------------------------------------------------------------------
SHARED_RATIO_SYSTEMS = ("gdps", "gdps_similarity_ratio")


def shared_ratio_check(found: list[dict], references: dict, n_samples: int) -> dict:
    """Per conflict seed with all three systems: GDPS (groups from conflict edges share nothing)
    and gdps_similarity_ratio (the similarity rule's shared ratio) against the tagged baseline,
    paired bootstrap of the pooled test set. The check's seeds have no stock baseline, so there is
    no learned-regime check."""
    runs: dict = {}
    for r in found:
        if r["condition"] == "conflict":
            runs.setdefault(r["seed"], {})[r["system"]] = r
    cache: dict = {}
    seeds = {}
    for seed, by_system in sorted(runs.items()):
        if not {"tagged", *SHARED_RATIO_SYSTEMS} <= set(by_system):
            continue
        tagged = by_system["tagged"]
        row = {"tagged": tagged["average"]["bleu"]}
        for system in SHARED_RATIO_SYSTEMS:
            r = by_system[system]
            sig = paired_significance(references["conflict"], tagged, r, n_samples, cache)
            row[system] = {"average": r["average"]["bleu"], "split": r["split"],
                           "delta_average": r["average"]["bleu"] - tagged["average"]["bleu"],
                           "delta_languages": {l: r["scores"][l]["bleu"] - tagged["scores"][l]["bleu"]
                                               for l in sorted(r["scores"])},
                           "p_pooled": sig["pooled"]["p_value"]}
        seeds[seed] = row
    return {"seeds": seeds, "bootstrap": n_samples}


def shared_ratio_markdown(summary: dict) -> str:
    """The check's table per seed, and how the two ratios compare over the seeds."""
    seeds = summary["seeds"]
    lines = ["<!-- generated by benchmarks/quality.py --ratio-validation; do not edit -->", "",
             "Conflict condition, fresh seeds; average BLEU and the difference to the tagged baseline "
             f"(pooled paired bootstrap p, {summary['bootstrap']} samples):", "",
             "| seed | split | groups | tagged | GDPS, no shared units (new rule) | GDPS, similarity rule's ratio |",
             "|---|---|---|---:|---:|---:|"]

    def cell(s):
        return f"{s['average']:.1f} ({s['delta_average']:+.1f}, p {s['p_pooled']:.3f})"

    for seed, row in seeds.items():
        new, old = row["gdps"], row["gdps_similarity_ratio"]
        lines.append(f"| {seed} | {', '.join(new['split']['modules'])} | {display_groups(new['split']['groups'])} | "
                     f"{row['tagged']:.1f} | {cell(new)} | {cell(old)} (ratio {old['split']['shared_ratio']:g}) |")
    if seeds:
        n = len(seeds)
        wins = sum(row["gdps"]["average"] > row["gdps_similarity_ratio"]["average"] for row in seeds.values())
        d_new = mean(row["gdps"]["delta_average"] for row in seeds.values())
        d_old = mean(row["gdps_similarity_ratio"]["delta_average"] for row in seeds.values())
        languages = sorted(next(iter(seeds.values()))["gdps"]["delta_languages"])

        def per_language(system):
            return ", ".join(f"{l} {mean(row[system]['delta_languages'][l] for row in seeds.values()):+.1f}"
                             for l in languages)

        lines += ["", f"- No shared units above the similarity rule's ratio in **{wins} of {n}** seeds; against the "
                      f"tagged baseline {d_new:+.1f} vs {d_old:+.1f} average BLEU (mean over {n} seeds).",
                  f"- Per language against the tagged baseline, no shared units: {per_language('gdps')}.",
                  f"- Per language against the tagged baseline, similarity rule: {per_language('gdps_similarity_ratio')}."]
    return "\n".join(lines) + "\n"
