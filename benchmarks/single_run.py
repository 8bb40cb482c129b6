"""What GDPS in one fairseq-train saves against the two-stage form, and that both give one model.

    python -m benchmarks.single_run --data DATA --work DIR [--max-update 2000 --stage1 1250]
                                    [--probe-interval 4] [--seed 1] [--analyze-args "..."] [--publish]
    python -m benchmarks.single_run --markdown benchmarks/results/single_run.json

Runs ``run_gdps.sh`` both ways on the same prepared data, side by side with one thread each (so
that both meet the same machine): by default (one ``fairseq-train`` with
``--gdps-split-at-update``), and with ``--two-stage`` (stage-1 ``fairseq-train``, ``gdps-analyze``,
``gdps-split-checkpoint``, stage-2 ``fairseq-train``), both with ``--lang-embedding`` and the
decode of the whole test set. Records the wall time of each recipe, whether the final models and
plans are identical, and both systems' scores, in ``benchmarks/results/single_run.json`` and
``.md``; ``--publish`` also puts the table into docs/benchmarks.md.
"""
import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

if not __package__:
    sys.exit("run the benchmark from the repository root as a module: python -m benchmarks.single_run ...")

from benchmarks.common import (REPO, RESULTS, command_line, machine_details, portable_args, portable_path,
                               print_results_markdown,
                               replace_between, software_versions, write_results)

RECIPE = REPO / "examples" / "speech_to_text_gdps" / "run_gdps.sh"
FORMS = {"single_run": [], "two_stage": ["--two-stage"]}
# where each form leaves its final checkpoint and its plan
FINAL = {"single_run": ("checkpoints/checkpoint_last.pt", "checkpoints/gdps_analysis/plan.json"),
         "two_stage": ("stage2/checkpoint_last.pt", "analysis/plan.json")}


def run_form(form: str, data: Path, out: Path, args: argparse.Namespace, extra: list) -> dict:
    cmd = ["bash", str(RECIPE), str(data), str(out), *FORMS[form], "--lang-embedding", "--max-update", str(args.max_update),
           "--stage1-updates", str(args.stage1), "--probe-interval", str(args.probe_interval), "--seed", str(args.seed),
           "--analyze-args", args.analyze_args, "--decode-args", "--splits test", *(["--", *extra] if extra else [])]
    start = time.perf_counter()
    with open(out.parent / f"{form}.log", "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"single_run.py: run_gdps.sh ({form}) failed: {out.parent / f'{form}.log'}")
    return {"wall_s": round(wall, 1), "command": shlex.join(["bash", *portable_args(cmd[1:])])}


def model_digest(checkpoint: Path) -> str:
    """sha256 of the model's tensors, by name (bit-identical weights give identical digests)."""
    import torch

    state = torch.load(checkpoint, map_location="cpu")["model"]
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def measure(args: argparse.Namespace, extra: list) -> dict:
    import fairseq_gdps  # noqa: F401  (weights-only loading of fairseq checkpoints)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = machine_details()
    with futures.ThreadPoolExecutor(len(FORMS)) as pool:
        jobs = {form: pool.submit(run_form, form, Path(args.data), work / form, args, extra) for form in FORMS}
        runs = {form: job.result() for form, job in jobs.items()}
    for form, (checkpoint, plan) in FINAL.items():
        runs[form]["model_sha256"] = model_digest(work / form / checkpoint)
        runs[form]["plan"] = {k: v for k, v in json.loads((work / form / plan).read_text()).items()
                              if k in ("modules", "groups", "shared_ratio")}
        scores = json.loads((work / form / "scores.json").read_text())
        runs[form]["average_bleu"] = round(scores["average"]["bleu"], 2)
        runs[form]["bleu"] = {lang: round(s["bleu"], 2) for lang, s in scores["languages"].items()}
    return {
        "benchmark": "single_run",
        "command": command_line("single_run", None),
        "setting": {"max_update": args.max_update, "stage1": args.stage1, "probe_interval": args.probe_interval,
                    "seed": args.seed, "analyze_args": args.analyze_args, "data": portable_path(args.data),
                    "extra": extra, "threads_per_run": 1},
        "machine": started,
        "versions": software_versions(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "runs": runs,
        "identical_models": runs["single_run"]["model_sha256"] == runs["two_stage"]["model_sha256"],
        "identical_plans": runs["single_run"]["plan"] == runs["two_stage"]["plan"],
        "saved_s": round(runs["two_stage"]["wall_s"] - runs["single_run"]["wall_s"], 1),
    }


def markdown(r: dict) -> str:
    s, m = r["setting"], r["machine"]
    one, two = r["runs"]["single_run"], r["runs"]["two_stage"]
    lines = [
        f"Measured {r['finished']} on {m['cpu']} ({m['cores']} cores, 1-minute load average "
        f"{m['load_average_at_start'][0]:.1f} when it started), torch {r['versions'].get('torch')}, both forms side "
        f"by side with {s['threads_per_run']} thread each: `{r['command']}`. Setting: {s['max_update']} updates, "
        f"the split after {s['stage1']}, probe every {s['probe_interval']}, seed {s['seed']}, data `{s['data']}`; "
        "each recipe's wall time includes its decode of the test set and the scoring, the same in both.",
        "",
        "| form | processes | wall s | average BLEU | plan |",
        "|---|---|---:|---:|---|",
        f"| one run (`run_gdps.sh`) | 1 `fairseq-train` | {one['wall_s']:.0f} | {one['average_bleu']:.2f} | "
        f"{_plan(one['plan'])} |",
        f"| two stages (`run_gdps.sh --two-stage`) | 2 `fairseq-train` + `gdps-analyze` + `gdps-split-checkpoint` | "
        f"{two['wall_s']:.0f} | {two['average_bleu']:.2f} | {_plan(two['plan'])} |",
        "",
        f"One run saved {r['saved_s']:.0f} s ({100 * r['saved_s'] / two['wall_s']:.1f}% of the two-stage recipe). "
        f"Final models bit-identical: **{'yes' if r['identical_models'] else 'no'}**; same plan: "
        f"**{'yes' if r['identical_plans'] else 'no'}**."
        + ("" if len(one["plan"]["groups"]) > 1 else
           " (The plan keeps one group: the one run then goes on unsplit, while the two-stage recipe re-lays the "
           "block's units as a one-group split, the same function with other floating-point sums.)"),
    ]
    return "\n".join(lines) + "\n"


def _plan(plan: dict) -> str:
    groups = " / ".join("{" + ", ".join(g) + "}" for g in plan["groups"])
    return f"{', '.join(plan['modules'])}: {groups}, shared {plan['shared_ratio']:g}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.single_run", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="prepared data folder (gdps-prep's output)")
    p.add_argument("--work", help="folder for the two runs (checkpoints, decodes; not for git)")
    p.add_argument("--max-update", type=int, default=2000)
    p.add_argument("--stage1", type=int, default=1250, help="update of the switch (the two-stage form's stage 1)")
    p.add_argument("--probe-interval", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--analyze-args", default="", help="gdps-analyze flags for both forms (e.g. '--groups 2' to force a split)")
    p.add_argument("--out", default=str(RESULTS), help="folder of single_run.json / .md")
    p.add_argument("--publish", action="store_true", help="also write the table into docs/benchmarks.md")
    p.add_argument("--markdown", metavar="JSON", help="print the markdown of an existing results file and stop")
    args, extra = p.parse_known_args(argv)
    if args.markdown:
        print_results_markdown(p, args.markdown, markdown)
        return 0
    if not args.data or not args.work:
        p.error("--data and --work are needed (or --markdown JSON)")
    if not (Path(args.data) / "config.yaml").is_file():
        p.error(f"--data {args.data}: no config.yaml there (prepare it with gdps-prep)")
    if extra and extra[0] == "--":
        extra = extra[1:]
    results = measure(args, extra)
    paths = write_results(results, Path(args.out), "single_run", markdown)
    if args.publish:
        replace_between(REPO / "docs" / "benchmarks.md", "single-run-results", markdown(results))
    sys.stdout.write(markdown(results))
    print(f"results: {paths['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
