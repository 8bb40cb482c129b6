"""Quality benchmark: GDPS against both baselines and its controls, where the models have learned.

    python -m benchmarks.quality [--setting learned|tiny] [--seeds 1 2 3] [--conditions natural conflict]
                                 [--systems ...] [--jobs 2] [--work DIR] [--results DIR]
    python -m benchmarks.quality --report-only [--publish]     # the report from the records alone
    python -m benchmarks.quality --plan-only                   # what is left, and how long it should take
    python -m benchmarks.quality --ratio-validation DIR [--publish]   # the shared-ratio check (below)

(from the repository root).

Systems (same prepared corpus, same total number of updates ``max_update``):

* ``baseline``       stock fairseq ``speech_to_text`` + ``s2t_transformer``: no language information;
* ``gdps``           the GDPS network with a language embedding (``--gdps-lang-embedding``): stage 1
                     (probe) for ``stage1`` updates, gdps-analyze, stage 2 with the plan's split;
* ``tagged``         the tagged baseline: GDPS's own stage 1 continued unsplit to ``max_update``. The
                     probe leaves training bit-identical, so GDPS's first ``stage1`` updates ARE the
                     tagged baseline's (one run, two systems: the machine's time goes to seeds);
* ``full_split``     GDPS's module(s) split with no shared units, one block per language;
* ``full_split_matched`` GDPS's module(s), a block per language with the size of GDPS's plan: the
                     private blocks are narrower (more units shared) so the split block has exactly
                     the plan's width, the control that asks whether the analysis' grouping beats
                     "split everything" at equal size;
* ``random_groups``  GDPS's module(s) and ratio, languages shuffled into groups of the plan's sizes
                     (the same size as GDPS's plan by construction);
* ``param_diff``     the Parameter Differentiation rule: GDPS's module(s) copied whole per cluster,
                     two clusters (gdps-analyze --groups 2), no shared part;
* ``gdps_similarity_ratio`` (opt-in) GDPS's module(s) and groups with the similarity rule's shared
                     ratio (``gdps-analyze --conflict-shared-ratio similarity``, the rule before groups
                     from conflict edges got none): what the shared part costs or gives;
* ``bilingual``      (opt-in: ``--systems ... bilingual``) one stock model per language,
                     ``max_update / n_languages`` updates each.

Every split system continues GDPS's stage-1 checkpoint with the same language embedding, so they
differ from GDPS only in the split and from the tagged baseline only in having one.

Conditions: ``natural`` (the quick demo corpus) and ``conflict`` (the same plus ``xx``: Estonian
spoken by Estonian's own speakers, ``--conflict-speakers shared``, with numbers and units
permuted, so it differs from ``et`` in meaning only; the right grouping isolates ``xx``);
opt-in, ``conflict_units``: ``xx`` permutes only the units (its numbers agree with ``et``'s), a
partial conflict. Where a conflict is planted, the ``oracle`` system (the planted split: ``xx``
alone at every decoder FFN, nothing shared, continuing GDPS's stage 1) says what a split is worth
there, independently of the analysis.

The setting ``learned`` is chosen from measured learning curves (docs/benchmarks.md): the demo
corpus' sentence templates are learned early, its content (numbers and units) much later, and the
planted conflict shows in the same-state gradients only once the content is being learned. So
stage 1 (probed from the start) runs well into the learning of the content before stage 2 takes
over. The report checks per seed that the stock baseline has learned the content
(quality_records.LEARNED_CRITERION) and leaves out seeds that have not, saying so.

Runs live in WORK/<condition>/seed<S>/<system>/ (checkpoints, features: never in git). Each
finished run becomes a record, RESULTS/quality/<setting>/<condition>/seed<S>/<system>.json
(quality_records.py), and the report (RESULTS/quality.md, quality.json,
quality_learning_curves.png) is generated from the records alone. A run set is completed over
several sittings: recorded runs are skipped, an unfinished run restarts from its beginning, and a
partial set is reported as partial with what is left. ``--publish`` also puts the report into
docs/benchmarks.md (its quality-results section).

The shared-ratio check: groups from conflict edges share none of the split block
(``gdps-analyze --conflict-shared-ratio``, default 0), a rule chosen on the conflict seeds of the
run set; it is checked on conflict seeds that choice did not see, with the tagged baseline, GDPS and
gdps_similarity_ratio only (no stock baseline, so not a run set of its own):

    python -m benchmarks.quality --results DIR --seeds 4 5 --conditions conflict --systems tagged gdps gdps_similarity_ratio
    python -m benchmarks.quality --ratio-validation DIR [--publish]

The second writes RESULTS/ratio_validation.md and .json from DIR's records alone (paired
bootstrap per seed against the tagged baseline), and with ``--publish`` puts the table into
docs/benchmarks.md (its ratio-validation section). The committed records of that check are in
benchmarks/results/ratio_validation/.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

if not __package__:
    sys.exit("run the quality benchmark from the repository root as a module: python -m benchmarks.quality ...")

from benchmarks import quality_records as records
from fairseq_gdps.models.split_spec import format_groups
from benchmarks.common import REPO, RESULTS, machine_details, portable_path, replace_between, software_versions, write_json

RECIPES = REPO / "examples" / "speech_to_text_gdps"
SYSTEMS = ("baseline", "tagged", "gdps", "full_split", "full_split_matched", "random_groups", "param_diff", "oracle",
           "gdps_similarity_ratio", "bilingual")
# opt-in: bilingual models answer another question and cost the most; gdps_similarity_ratio is a
# diagnostic (GDPS's grouping with the similarity rule's shared part: what does sharing do?)
DEFAULT_SYSTEMS = SYSTEMS[:-2]
SPLIT_CONTROLS = ("full_split", "full_split_matched", "random_groups", "param_diff", "oracle", "gdps_similarity_ratio")
CONFLICT_LANGUAGE = records.CONFLICT_LANGUAGE
CONFLICT_SPEAKERS = "shared"  # xx is spoken by et's speakers: it differs from et in meaning only
_PLANTED = ["--conflict-language", f"{CONFLICT_LANGUAGE}:{records.CONFLICT_BASE}", "--conflict-speakers", CONFLICT_SPEAKERS]
# corpus flags of each condition (gdps-make-corpus); the planted ones also have the oracle system
CONDITIONS = {"natural": [], "conflict": _PLANTED, "conflict_units": [*_PLANTED, "--conflict-remap", "units"]}
# the planted split: the conflict language alone at every decoder FFN of the recipes' model
ORACLE_MODULES = ["decoder.layers.0.ffn", "decoder.layers.1.ffn"]

SETTINGS = {
    # the learned regime (see the module's docstring)
    "learned": dict(utterances=None, vocab=None, max_update=2000, stage1=1250, probe_interval=4,
                    seeds=[1, 2, 3], conditions=["natural", "conflict"], bootstrap=1000,
                    criterion=records.LEARNED_CRITERION),
    # seconds per run: exercises every code path in the test suite (its models learn nothing)
    "tiny": dict(utterances=30, vocab=64, max_update=6, stage1=3, probe_interval=1,
                 seeds=[1], conditions=["natural"], bootstrap=50,
                 criterion={"min_average_bleu": 0.0, "min_final_dev_accuracy": 0.0}),
}
RUN_DEFINING = ("utterances", "vocab", "max_update", "stage1", "probe_interval")
# wall seconds per update of one run (two at a time, one thread each) on this project's 2-core
# machine, for the estimate of what is left before any run of a system is recorded
SECONDS_PER_UPDATE = {"baseline": 0.55, "gdps": 0.65, "tagged": 0.55, "full_split": 0.6, "full_split_matched": 0.6,
                      "random_groups": 0.6, "param_diff": 0.6, "oracle": 0.6, "bilingual": 0.5}

logger = logging.getLogger("quality")
SAME_PARTITION = "no other grouping of the plan's sizes"  # why random_groups may be GDPS's own run


# ---------------------------------------------------------------------------------------------
# pure helpers (unit-tested)
# ---------------------------------------------------------------------------------------------

def size_matched_shared_ratio(plan_groups: int, plan_shared_ratio: float, n_languages: int) -> float:
    """The shared ratio at which one private block per language gives a split block of the plan's
    width: a block of ``h`` units split at ratio ``r`` into ``G`` groups has ``h * (r + G * (1 - r))``
    units; with ``n_languages`` groups that width needs ``1 - r' = (1 - r) * (G - 1) / (n_languages - 1)``.
    One group gives 1.0 (nothing private: no split at all)."""
    if n_languages < 2 or not 1 <= plan_groups <= n_languages:
        raise ValueError(f"need 1 <= plan groups ({plan_groups}) <= languages ({n_languages}) and >= 2 languages")
    if not 0.0 <= plan_shared_ratio <= 1.0:
        raise ValueError(f"shared ratio must lie in [0, 1], got {plan_shared_ratio}")
    return 1.0 - (1.0 - plan_shared_ratio) * (plan_groups - 1) / (n_languages - 1)


def reuse_reason(control: str, plan: dict, seed: int) -> Optional[str]:
    """Why the split control ``control`` would be GDPS's own run (same start, split and seed) for
    this plan, or None when it is a run of its own."""
    if control == "full_split_matched" and len(plan["groups"]) == 1:
        return "one group: at the plan's width nothing is private"
    if control == "gdps_similarity_ratio" and similarity_rule_ratio(plan) == plan["shared_ratio"]:
        return "the plan's ratio is the similarity rule's"
    if control == "random_groups" and ({frozenset(g) for g in random_partition(plan["groups"], seed)}
                                       == {frozenset(g) for g in plan["groups"]}):
        return SAME_PARTITION   # one group, or one language per group: no other partition of these sizes
    return None


def similarity_rule_ratio(plan: dict) -> float:
    """The similarity rule's shared ratio of a plan (a plan made before the conflict rule has it as its own)."""
    return plan["provenance"]["ratio"].get("similarity_rule", plan["shared_ratio"])


def plan_split(plan: dict) -> dict:
    return {k: plan[k] for k in ("modules", "groups", "shared_ratio")}


def random_partition(plan_groups: list[list[str]], seed: int, attempts: int = 100) -> list[list[str]]:
    """Languages shuffled into groups of the plan's sizes, different from the plan's partition
    whenever another partition with those sizes exists."""
    languages = sorted(lang for g in plan_groups for lang in g)
    sizes = [len(g) for g in plan_groups]
    target = {frozenset(g) for g in plan_groups}
    rng = random.Random(seed)
    groups = plan_groups
    for _ in range(attempts):
        shuffled = languages[:]
        rng.shuffle(shuffled)
        start, groups = 0, []
        for size in sizes:
            groups.append(sorted(shuffled[start:start + size]))
            start += size
        if {frozenset(g) for g in groups} != target:
            break
    return groups


# ---------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------

@dataclass
class Job:
    name: str
    out: Path
    command: Callable[[], None]
    deps: list[str] = field(default_factory=list)
    restart_clean: bool = True  # an unfinished run is deleted before it starts again


class Benchmark:
    poll_seconds = 30  # how often a call waiting on another call's run looks again

    def __init__(self, args, setting: dict):
        self.args, self.s = args, setting
        self.work = args.work.resolve()
        self.env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                        PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")

    # -- shell ----------------------------------------------------------------------------------
    def sh(self, cmd: list, log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            proc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=REPO)
        if proc.returncode != 0:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} ... failed ({proc.returncode}); log {log}:\n" + "\n".join(tail))

    # -- data -----------------------------------------------------------------------------------
    def data_dir(self, condition: str) -> Path:
        given = dict(item.split("=", 1) for item in self.args.data or [])
        if condition in given:
            return Path(given[condition]).resolve()
        root = self.work / condition
        data = root / "data"
        if condition in records.PLANTED_CONDITIONS:
            self.check_conflict_corpus(root / "corpus")
        if (data / "config.yaml").is_file():
            return data
        corpus = root / "corpus"
        if not (corpus / "test.tsv").is_file():
            shutil.rmtree(corpus, ignore_errors=True)
            cmd = ["gdps-make-corpus", "--profile", "quick", "--seed", "1", "--out", corpus]
            if self.s["utterances"]:
                cmd += ["--utterances-per-language", self.s["utterances"]]
            cmd += CONDITIONS[condition]
            self.sh(cmd, root / "corpus.log")
        shutil.rmtree(data, ignore_errors=True)
        cmd = ["gdps-prep", "--corpus", corpus, "--out", data]
        if self.s["vocab"]:
            cmd += ["--vocab-size", self.s["vocab"]]
        self.sh(cmd, root / "prep.log")
        return data

    @staticmethod
    def check_conflict_corpus(corpus: Path) -> None:
        """A conflict corpus made before the condition used shared speakers (own xx voices, so
        xx differed from et by voice too) must not be reused, nor the runs trained on it."""
        meta = corpus / "corpus.json"
        if not meta.is_file():
            return
        made = json.loads(meta.read_text(encoding="utf-8")).get("settings", {}).get("conflict_speakers", "own")
        if made != CONFLICT_SPEAKERS:
            raise SystemExit(f"quality.py: {corpus} was made with --conflict-speakers {made}, the conflict condition "
                             f"now uses --conflict-speakers {CONFLICT_SPEAKERS}: remove {corpus.parent} (its corpus, "
                             "data and runs) or use another --work folder")

    @staticmethod
    def languages(data: Path) -> list[str]:
        return sorted(p.stem[len("test_"):] for p in data.glob("test_*.tsv"))

    # -- jobs -----------------------------------------------------------------------------------
    def jobs_for(self, condition: str, seed: int, data: Path) -> list[Job]:
        root = self.work / condition / f"seed{seed}"
        s, langs = self.s, self.languages(data)
        common = ["--max-update", s["max_update"], "--seed", seed]
        decode_joint = ["--decode-args", "--splits test"]
        gdps_dir = root / "gdps"
        gdps_name = f"{condition}/seed{seed}/gdps"
        jobs = [
            Job(f"{condition}/seed{seed}/baseline", root / "baseline",
                lambda: self.sh(["bash", RECIPES / "run_baseline.sh", data, root / "baseline", *common, *decode_joint],
                                root / "baseline.log")),
            Job(gdps_name, gdps_dir,
                # the two-stage form: the tagged baseline and the split controls continue its stage 1
                lambda: self.sh(["bash", RECIPES / "run_gdps.sh", data, gdps_dir, *common, "--two-stage", "--stage1-updates",
                                 s["stage1"], "--probe-interval", s["probe_interval"], "--lang-embedding", *decode_joint],
                                root / "gdps.log")),
            Job(f"{condition}/seed{seed}/tagged", root / "tagged",
                lambda: self.sh(["bash", RECIPES / "run_gdps.sh", data, root / "tagged", *common, "--stage1-updates",
                                 s["stage1"], "--stage1-from", gdps_dir, "--no-split", "--lang-embedding", *decode_joint],
                                root / "tagged.log"),
                deps=[gdps_name]),
        ]
        for control in SPLIT_CONTROLS:
            if control == "oracle" and condition not in records.PLANTED_CONDITIONS:
                continue   # nothing planted: no known right split
            jobs.append(Job(f"{condition}/seed{seed}/{control}", root / control,
                            (lambda c=control: self.run_control(c, data, root, seed, langs)), deps=[gdps_name]))
        per_language = max(1, s["max_update"] // len(langs))
        for lang in langs:
            out = root / "bilingual" / lang
            jobs.append(Job(f"{condition}/seed{seed}/bilingual_{lang}", out,
                            (lambda out=out, lang=lang: self.sh(
                                ["bash", RECIPES / "run_baseline.sh", data, out, "--max-update", per_language, "--seed", seed,
                                 "--decode-args", f"--splits test_{lang}", "--", "--train-subset", f"train_{lang}",
                                 "--valid-subset", f"dev_{lang}"], out.with_suffix(".log")))))
        jobs.append(Job(f"{condition}/seed{seed}/bilingual", root / "bilingual",
                        lambda: self.merge_bilingual(data, root / "bilingual", langs),
                        deps=[f"{condition}/seed{seed}/bilingual_{lang}" for lang in langs],
                        restart_clean=False))  # its folder holds the per-language runs
        return jobs

    def run_control(self, control: str, data: Path, root: Path, seed: int, langs: list[str]) -> None:
        gdps = root / "gdps"
        plan = json.loads((gdps / "analysis" / "plan.json").read_text())
        split_modules = plan["modules"]
        why = reuse_reason(control, plan, seed)
        if why:   # the run would be GDPS's stage 2 again: its result is reused
            self.reuse_run(gdps, root / control, plan_split(plan), why)
            return
        if control == "full_split":
            groups, ratio = [[lang] for lang in langs], 0.0
        elif control == "full_split_matched":
            groups = [[lang] for lang in langs]
            ratio = size_matched_shared_ratio(len(plan["groups"]), plan["shared_ratio"], len(langs))
        elif control == "gdps_similarity_ratio":
            groups, ratio = plan["groups"], similarity_rule_ratio(plan)
        elif control == "oracle":
            split_modules = ORACLE_MODULES
            groups = [[lang for lang in langs if lang != CONFLICT_LANGUAGE], [CONFLICT_LANGUAGE]]
            ratio = 0.0
        elif control == "random_groups":
            groups, ratio = random_partition(plan["groups"], seed), plan["shared_ratio"]
        else:  # param_diff: two clusters from the same statistics, whole-module copies
            self.sh(["gdps-analyze", gdps / "stage1" / "gdps_stats.pt", "--out", gdps / "analysis_two_clusters",
                     "--groups", "2", "--resamples", "0"], root / "param_diff_analysis.log")
            two = json.loads((gdps / "analysis_two_clusters" / "plan.json").read_text())
            groups, ratio = two["groups"], 0.0
        out = root / control
        out.mkdir(parents=True, exist_ok=True)
        (out / "split.json").write_text(json.dumps({"modules": split_modules, "groups": groups, "shared_ratio": ratio}) + "\n")
        self.sh(["bash", RECIPES / "run_gdps.sh", data, out, "--max-update", self.s["max_update"], "--seed", seed,
                 "--stage1-updates", self.s["stage1"], "--stage1-from", gdps, "--split-modules", ",".join(split_modules),
                 "--groups", format_groups(groups), "--shared-ratio", ratio, "--lang-embedding",
                 "--decode-args", "--splits test"], root / f"{control}.log")

    @staticmethod
    def reuse_run(source: Path, out: Path, split: dict, why: str) -> None:
        """``out`` becomes the finished run ``source`` (same model): its scores, decodes, training log
        and best checkpoint (hard-linked), with the split written down and where it came from and why."""
        out.mkdir(parents=True, exist_ok=True)
        (out / "stage2").mkdir(exist_ok=True)
        os.link(source / "stage2" / "checkpoint_best.pt", out / "stage2" / "checkpoint_best.pt")
        shutil.copytree(source / "decode", out / "decode")
        for name in ("train.log", "scores.md"):
            if (source / name).is_file():
                shutil.copy(source / name, out / name)
        (out / "split.json").write_text(json.dumps(split) + "\n")
        (out / "reused_from.txt").write_text(f"{source}\n{why}\n")
        shutil.copy(source / "scores.json", out / "scores.json")  # last: marks the run finished

    def merge_bilingual(self, data: Path, out: Path, langs: list[str]) -> None:
        decode = out / "decode"
        decode.mkdir(parents=True, exist_ok=True)
        for lang in langs:
            shutil.copy(out / lang / "decode" / f"test_{lang}.txt", decode / f"test_{lang}.txt")
        self.sh(["gdps-score", "--data", data, "--decode-dir", decode, "--out", out / "scores"], out / "score.log")

    # -- records --------------------------------------------------------------------------------
    @property
    def records_root(self) -> Path:
        return records_root(self.args.results, self.args.setting)

    def run_setting(self) -> dict:
        return {k: self.s[k] for k in RUN_DEFINING}

    def record_of(self, job: Job) -> Optional[Path]:
        """The record a job ends in (None: a bilingual model's part, recorded with the merge)."""
        condition, seed, system = job.name.split("/")
        if system not in SYSTEMS:
            return None
        return records.record_path(self.records_root, condition, int(seed[len("seed"):]), system)

    def write_record(self, job: Job, data: Path, wall_seconds: Optional[float]) -> None:
        """The finished run ``job.out`` as a record (its scores, hypotheses, dev curve, split, plan)."""
        from fairseq_gdps.data.train_log import read_validations

        condition, seed, system = job.name.split("/")
        run = job.out
        references_sha = records.write_references(self.records_root, condition, data, corpus_settings(data))
        scores = json.loads((run / "scores.json").read_text())
        if system == "bilingual":
            checkpoints = [c for c in (checkpoint_of(p) for p in sorted(run.iterdir()) if p.is_dir()) if c]
            params, curve = sum(parameter_count(c) for c in checkpoints), []  # per-language dev sets: not comparable
        else:
            checkpoint = checkpoint_of(run)
            params = parameter_count(checkpoint) if checkpoint else None
            curve = [{k: v[k] for k in ("num_updates", "loss", "accuracy") if k in v}
                     for v in read_validations(run / "train.log") if v.get("subset") == "dev"]
        split = plan = None
        if system in records.SPLIT_SYSTEMS:
            split_file = run / "split.json"
            plan = json.loads((run / "analysis" / "plan.json").read_text()) if system == "gdps" else None
            split = json.loads(split_file.read_text()) if split_file.is_file() else \
                {k: plan[k] for k in ("modules", "groups", "shared_ratio")}
            if plan:
                plan.get("provenance", {}).pop("stats_file", None)  # a path on the machine that ran it
        notes = None
        if (run / "reused_from.txt").is_file():
            source, _, why = (run / "reused_from.txt").read_text().strip().partition("\n")
            notes = f"reused from {Path(source).name}: {why or SAME_PARTITION}"
        record = records.make_record(
            setting_name=self.args.setting, run_setting=self.run_setting(), condition=condition,
            seed=int(seed[len("seed"):]), system=system, scores=scores,
            hypotheses=records.hypotheses_of(data, run / "decode"), references_sha256=references_sha,
            dev_curve=curve, params=params, split=split, plan=plan, wall_seconds=wall_seconds, versions=software_versions(),
            machine=machine_details(), threads=self.args.threads, notes=notes)
        write_json(self.record_of(job), record)

    def record_reused_from_gdps_record(self, job: Job) -> bool:
        """A split control that is GDPS's own run (:func:`reuse_reason`) is recorded from GDPS's
        record when GDPS's run folder is gone (recorded in another sitting). Returns whether it was."""
        condition, seed, system = job.name.split("/")
        source = records.record_path(self.records_root, condition, int(seed[len("seed"):]), "gdps")
        if system not in SPLIT_CONTROLS or not source.is_file():
            return False
        gdps = json.loads(source.read_text(encoding="utf-8"))
        why = gdps.get("plan") and reuse_reason(system, gdps["plan"], gdps["seed"])
        if not why:
            return False
        record = dict(gdps, system=system, language_information=records.LANGUAGE_INFORMATION[system],
                      split=plan_split(gdps["plan"]), plan=None, wall_seconds=None, notes=f"reused from gdps: {why}",
                      finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        record.pop("path", None)
        write_json(self.record_of(job), record)
        logger.info(f"done  {job.name}: GDPS's own run ({why}), recorded from its record")
        return True

    def check_records_setting(self) -> None:
        """A records folder keeps one training setting: refuse to mix runs of another budget into it
        (and into the work folder, whose finished runs are reused by name)."""
        wanted = self.run_setting()
        for path in (self.records_root / "setting.json", self.work / "setting.json"):
            if path.is_file():
                recorded = json.loads(path.read_text())
                if recorded != wanted:
                    differ = ", ".join(f"{k} {recorded.get(k)} -> {wanted[k]}" for k in wanted if recorded.get(k) != wanted[k])
                    raise SystemExit(f"quality.py: {path} holds runs made with another setting ({differ}); "
                                     "use another --work/--results folder or the same setting")
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(wanted, sort_keys=True) + "\n")

    # -- scheduling -----------------------------------------------------------------------------
    def all_jobs(self) -> tuple[list[Job], dict[str, Path]]:
        jobs, data_of = [], {}
        for seed in self.s["seeds"]:
            for condition in self.s["conditions"]:
                data = self.data_dir(condition)
                for job in self.jobs_for(condition, seed, data):
                    system = job.name.split("/")[-1]
                    if system in self.args.systems or system.startswith("bilingual") and "bilingual" in self.args.systems:
                        jobs.append(job)
                        data_of[job.name] = data
        return jobs, data_of

    def lock_of(self, job: Job) -> Path:
        """Says which process is training ``job`` (several calls may share a work folder)."""
        return self.work / f"{job.name}.running"

    def is_recorded(self, job: Job) -> bool:
        record = self.record_of(job)
        return record.is_file() if record else False

    def plan_left(self, jobs: list[Job]) -> tuple[list[str], float]:
        """The systems' runs still to record, and the wall time they should take at ``--jobs``."""
        left = [j for j in jobs if self.record_of(j) and not self.is_recorded(j)]
        seconds = sum(expected_seconds(self.records_root, j.name.split("/")[-1], self.s["max_update"]) for j in left)
        return [j.name for j in left], seconds / max(1, self.args.jobs)

    def run_all(self) -> dict[str, str]:
        """Run every job whose run is not recorded, ``--jobs`` at a time, in order (seed-major, so a
        partial benchmark has whole seeds); returns job name -> 'done' | 'failed: ...' | 'skipped: ...'."""
        self.check_records_setting()
        jobs, data_of = self.all_jobs()
        status: dict[str, str] = {}
        for job in jobs:
            if self.is_recorded(job):
                status[job.name] = "done"
            elif (job.out / "scores.json").is_file():  # finished before it could be recorded
                if self.record_of(job):
                    self.write_record(job, data_of[job.name], read_wall_seconds(job.out))
                status[job.name] = "done"
        left, seconds = self.plan_left(jobs)
        logger.info(f"{len(left)} run(s) to record, about {seconds / 60:.0f} min at {self.args.jobs} at a time: "
                    + ", ".join(left))
        pending = [j for j in jobs if j.name not in status]
        running: dict[cf.Future, Job] = {}
        waiting_on: dict[str, int] = {}  # job -> the process of another call training it
        with cf.ThreadPoolExecutor(max_workers=self.args.jobs) as pool:
            while pending or running:
                for job in list(pending):
                    if len(running) >= self.args.jobs:
                        break
                    dep_states = [status.get(d) for d in job.deps]
                    if any(st is not None and st != "done" for st in dep_states):
                        status[job.name] = f"skipped: {job.deps} did not finish"
                        pending.remove(job)
                    elif all(st == "done" for st in dep_states):
                        holder = running_elsewhere(self.lock_of(job))
                        if holder:  # another quality.py call on this work folder is training it: wait for it
                            if waiting_on.get(job.name) != holder:
                                logger.info(f"wait  {job.name}: running in process {holder}")
                            waiting_on[job.name] = holder
                            continue
                        waiting_on.pop(job.name, None)
                        pending.remove(job)
                        if (job.out / "scores.json").is_file():  # finished by another call meanwhile
                            if self.record_of(job) and not self.is_recorded(job):
                                self.write_record(job, data_of[job.name], read_wall_seconds(job.out))
                            status[job.name] = "done"
                            continue
                        missing = [d for d in job.deps if not (self.work / d / "scores.json").is_file()]
                        if missing and self.record_reused_from_gdps_record(job):
                            status[job.name] = "done"
                            continue
                        if missing:  # recorded in another sitting, on another machine: the run folder is gone
                            status[job.name] = (f"failed: needs the run folder(s) {missing} under {self.work}, recorded "
                                                "elsewhere; remove their records to run them again here")
                            continue
                        self.lock_of(job).parent.mkdir(parents=True, exist_ok=True)
                        self.lock_of(job).write_text(f"{os.getpid()}\n")
                        if job.out.exists() and job.restart_clean:  # an unfinished run restarts from its beginning
                            shutil.rmtree(job.out)
                        logger.info(f"start {job.name}")
                        running[pool.submit(self._timed, job)] = job
                if not running:
                    if pending:  # every job left waits on a run of another call
                        time.sleep(self.poll_seconds)
                    continue
                done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    job = running.pop(future)
                    self.lock_of(job).unlink(missing_ok=True)
                    try:
                        seconds = future.result()
                        if self.record_of(job):
                            self.write_record(job, data_of[job.name], seconds)
                        status[job.name] = "done"
                        logger.info(f"done  {job.name} ({seconds:.0f} s)")
                    except Exception as e:  # one failed run must not stop the others
                        status[job.name] = f"failed: {e}"
                        logger.error(f"FAILED {job.name}: {e}")
        return status

    @staticmethod
    def _timed(job: Job) -> float:
        t0 = time.time()
        job.command()
        seconds = time.time() - t0
        (job.out / "wall_seconds.txt").write_text(f"{seconds:.1f}\n")
        return seconds


# ---------------------------------------------------------------------------------------------
# helpers of records and the report
# ---------------------------------------------------------------------------------------------

def records_root(results: Path, setting: str) -> Path:
    return results / "quality" / setting


def running_elsewhere(lock: Path) -> Optional[int]:
    """The live process, other than this one, that holds ``lock`` (None: nobody, or a stale lock)."""
    try:
        pid = int(lock.read_text().strip())
    except (OSError, ValueError):
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        return pid
    return pid


def read_wall_seconds(run: Path) -> Optional[float]:
    f = run / "wall_seconds.txt"
    return float(f.read_text()) if f.is_file() else None


def expected_seconds(root: Path, system: str, max_update: int) -> float:
    """A run's expected wall time: the mean of this system's recorded runs, else an estimate."""
    seen = []
    for path in root.glob(f"*/seed*/{system}.json"):
        wall = json.loads(path.read_text()).get("wall_seconds")
        if wall:
            seen.append(wall)
    if seen:
        return sum(seen) / len(seen)
    stage2_only = system in ("tagged",) + SPLIT_CONTROLS  # they continue GDPS's stage 1
    share = 0.4 if stage2_only else 1.0
    return SECONDS_PER_UPDATE.get(system, 0.6) * max_update * share + 60  # + decoding


def corpus_settings(data: Path) -> Optional[dict]:
    """The generator settings of the corpus a prepared data folder came from, where known."""
    prep = data / "prep.json"
    if prep.is_file():
        corpus = json.loads(prep.read_text()).get("corpus")
        meta = Path(corpus) / "corpus.json" if corpus else None
        if meta and meta.is_file():
            return json.loads(meta.read_text(encoding="utf-8")).get("settings")
    meta = data.parent / "corpus" / "corpus.json"
    return json.loads(meta.read_text(encoding="utf-8")).get("settings") if meta.is_file() else None


def checkpoint_of(run: Path) -> Optional[Path]:
    for candidate in (run / "stage2" / "checkpoint_best.pt", run / "checkpoints" / "checkpoint_best.pt"):
        if candidate.is_file():
            return candidate
    return None


def parameter_count(checkpoint: Path) -> int:
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return int(sum(t.numel() for t in state["model"].values() if hasattr(t, "numel")))


def report(results_dir: Path, setting_name: str, setting: dict, systems: list[str], publish: bool) -> dict:
    """quality.md, quality.json and the learning curves, from the records alone."""
    from fairseq_gdps.atomic import atomic_write

    root = records_root(results_dir, setting_name)
    run_setting = {k: setting[k] for k in RUN_DEFINING}
    found, references = records.load_records(root, setting_name, run_setting)
    cache_path = root / "significance_cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    logging.getLogger("sacrebleu").setLevel(logging.WARNING)
    results = records.aggregate(found, references, setting["bootstrap"], cache, setting["criterion"])
    write_json(cache_path, cache)
    # the report covers the whole run set, not only this call's part of it: a call restricted to one
    # seed or condition must not shrink the report to that part (or to "0 of N recorded")
    default = SETTINGS[setting_name]
    seeds = sorted(set(default["seeds"]) | set(setting["seeds"]) | {r["seed"] for r in found})
    conditions = [c for c in CONDITIONS
                  if c in default["conditions"] or c in setting["conditions"] or any(r["condition"] == c for r in found)]
    planned_systems = [s for s in SYSTEMS if s in DEFAULT_SYSTEMS or s in systems or any(r["system"] == s for r in found)]
    planned = [f"{c}/seed{s}/{sys}" for s in seeds for c in conditions for sys in planned_systems
               if sys != "oracle" or c in records.PLANTED_CONDITIONS]
    have = {f"{r['condition']}/seed{r['seed']}/{r['system']}" for r in found}
    plot = results_dir / "quality_learning_curves.png"
    if found:
        records.plot_learning_curves(found, plot)
    meta = {"setting": setting_name, "run_setting": run_setting, "seeds": seeds, "conditions": conditions,
            "bootstrap": setting["bootstrap"], "criterion": setting["criterion"],
            "records_dir": portable_path(root),
            "planned": len(planned), "recorded": len(have & set(planned)),
            "missing": [p for p in planned if p not in have],
            "left_minutes": sum(expected_seconds(root, p.split("/")[-1], setting["max_update"])
                                for p in planned if p not in have) / 2 / 60,
            "plot": "../benchmarks/results/quality_learning_curves.png" if found else None}
    text = records.to_markdown(results, meta)
    with atomic_write(results_dir / "quality.md") as f:
        f.write(text)
    with atomic_write(results_dir / "quality.json") as f:
        f.write(json.dumps({"meta": meta, "results": results}, indent=1, sort_keys=True, default=str) + "\n")
    if publish:
        replace_between(REPO / "docs" / "benchmarks.md", "quality-results", text)
    return meta


def ratio_validation(runs_dir: Path, results_dir: Path, setting_name: str, publish: bool) -> str:
    """The shared-ratio check (the module's docstring): ratio_validation.md and .json in
    ``results_dir``, from the records of the check's runs in ``runs_dir`` alone."""
    from fairseq_gdps.atomic import atomic_write

    setting = SETTINGS[setting_name]
    found, references = records.load_records(records_root(runs_dir, setting_name), setting_name,
                                             {k: setting[k] for k in RUN_DEFINING})
    logging.getLogger("sacrebleu").setLevel(logging.WARNING)
    summary = records.shared_ratio_check(found, references, setting["bootstrap"])
    text = records.shared_ratio_markdown(summary)
    write_json(results_dir / "ratio_validation.json", summary)
    with atomic_write(results_dir / "ratio_validation.md") as f:
        f.write(text)
    if publish:
        replace_between(REPO / "docs" / "benchmarks.md", "ratio-validation", text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="learned")
    parser.add_argument("--work", type=Path, default=REPO / "work" / "benchmark_quality",
                        help="run folders (checkpoints, decodes; kept between calls, never in git)")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="the records (RESULTS/quality/<setting>/) and the report")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: the setting's)")
    parser.add_argument("--conditions", nargs="+", choices=list(CONDITIONS))
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(DEFAULT_SYSTEMS),
                        help=f"default: {' '.join(DEFAULT_SYSTEMS)} (bilingual is opt-in)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="threads per run (default 1)")
    parser.add_argument("--data", nargs="+", metavar="CONDITION=DIR",
                        help="use this prepared data folder (gdps-prep output) for a condition instead of building it")
    parser.add_argument("--plan-only", action="store_true", help="say what is left to run and how long it should take")
    parser.add_argument("--report-only", action="store_true", help="only write the report from the records")
    parser.add_argument("--ratio-validation", type=Path, metavar="DIR",
                        help="only write the shared-ratio check's report (RESULTS/ratio_validation.md, .json) from the "
                             "records of its runs in DIR (their --results folder)")
    parser.add_argument("--publish", action="store_true",
                        help="also replace the report's generated section of docs/benchmarks.md")
    args = parser.parse_args(argv)
    # force: an import (fairseq's) has already configured the root logger at DEBUG
    logging.basicConfig(level=logging.INFO, format="[quality] %(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    setting = dict(SETTINGS[args.setting])
    for key, value in (("seeds", args.seeds), ("conditions", args.conditions)):
        if value is not None:
            setting[key] = value
    if "gdps" not in args.systems and any(s in args.systems for s in SPLIT_CONTROLS + ("tagged",)):
        parser.error("the tagged baseline and the split controls continue GDPS's stage 1: include gdps in --systems")
    for item in args.data or []:
        condition, _, folder = item.partition("=")
        if condition not in CONDITIONS or not (Path(folder) / "config.yaml").is_file():
            parser.error(f"--data {item}: expected CONDITION=DIR ({', '.join(CONDITIONS)}) with a gdps-prep folder "
                         "(config.yaml)")
    args.results = args.results.resolve()
    if args.ratio_validation:
        if not records_root(args.ratio_validation, args.setting).is_dir():
            parser.error(f"--ratio-validation {args.ratio_validation}: no records folder quality/{args.setting} in it "
                         "(give the --results folder of the check's runs)")
        print(ratio_validation(args.ratio_validation, args.results, args.setting, args.publish))
        return 0
    bench = Benchmark(args, setting)
    if args.plan_only:
        jobs, _ = bench.all_jobs()
        left, seconds = bench.plan_left(jobs)
        print(f"[quality] {len(left)} run(s) left, about {seconds / 60:.0f} min at {args.jobs} at a time")
        for name in left:
            print(f"  {name}")
        return 0
    status = {} if args.report_only else bench.run_all()
    meta = report(args.results, args.setting, setting, args.systems, args.publish)
    failed = {k: v for k, v in status.items() if v != "done"}
    for name, why in failed.items():
        print(f"[quality] {name}: {why}", file=sys.stderr)
    print(f"[quality] {meta['recorded']}/{meta['planned']} runs recorded; report {args.results}/quality.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
