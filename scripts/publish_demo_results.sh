#!/usr/bin/env bash
# Copy a finished demo run's results into docs/: its results.md between the demo-results markers of
# docs/benchmarks.md, its plots and analysis report beside it, and its one-line summary between the
# demo-summary markers of the README, so that the published numbers are the ones the run wrote
# (never typed by hand).
#   bash scripts/publish_demo_results.sh [WORK_DIR]   (default: work/demo_conflict)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-work/demo_conflict}
[ -f "$WORK/results.md" ] || { echo "no $WORK/results.md: run examples/speech_to_text_gdps/run_demo.sh first" >&2; exit 1; }
mkdir -p docs
# (its results.md goes into docs/benchmarks.md alone, below: one copy of each table)
cp "$WORK/learning_curve.png" docs/demo_learning_curve.png
ANALYSIS="$WORK/gdps/checkpoints/gdps_analysis"
cp "$ANALYSIS/report.md" docs/demo_analysis_report.md
# the report names the statistics file as the run was given it: the run's folder relative to the
# repository, never this machine's path
ABS_WORK=$(cd "$WORK" && pwd)
REL_WORK=$(python3 -c 'import os, sys; print(os.path.relpath(sys.argv[1]))' "$ABS_WORK")
sed -i "s|$ABS_WORK/|$REL_WORK/|g" docs/demo_analysis_report.md
# the report's plots sit beside it in docs/ under demo_analysis_<name>.png: rename its links alike
for png in similarity dendrogram layer_profile stability; do
  if [ -f "$ANALYSIS/$png.png" ]; then
    cp "$ANALYSIS/$png.png" "docs/demo_analysis_$png.png"
    sed -i "s|]($png.png)|](demo_analysis_$png.png)|g" docs/demo_analysis_report.md
  fi
done
python3 - "$WORK/results.md" <<'PY'
import re
import sys
from pathlib import Path

from benchmarks.common import replace_between

source = Path(sys.argv[1]).read_text()


# docs/benchmarks.md: the whole results, headings one level down (the page's section is "##")
results = source.replace("# Demo results", "### Demo results", 1).replace("\n## ", "\n#### ")
replace_between(Path("docs/benchmarks.md"), "demo-results",
                results.rstrip("\n") + "\n\n![learning curve](demo_learning_curve.png)\n")

# README: one line, from the title, the wall time and the average row of the comparison table
title = re.search(r"^# Demo results \((.*)\)$", source, re.M)
wall = re.search(r"total wall time of run_demo.sh (\d+) s", source)
cores = re.search(r"^Measured on (\d+) CPU cores", source, re.M)
table = source.split("## Test scores per language", 1)[1].split("\n## ", 1)[0]
rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines() if line.startswith("|")]
header, average = rows[0], next(r for r in rows if r[0] == "average")
bleu = {system: average[header.index(f"{system} BLEU")] for system in ("tagged", "gdps")}
decision = source.split("## GDPS's decision", 1)[1].split("\n## ", 1)[0]
groups = re.search(r"^- groups: (.*)$", decision, re.M)
split = re.search(r"^- split: (.*)$", decision, re.M)
did = (f"GDPS split {split.group(1)} into {groups.group(1)}" if "split at update" in decision
       else "GDPS kept one group (no split)")
replace_between(Path("README.md"), "demo-summary",
                f"Last published run ({title.group(1)}; {wall.group(1)} s on {cores.group(1)} CPU cores): "
                f"{did}; tagged baseline **{bleu['tagged']}**, GDPS **{bleu['gdps']}** average test BLEU.")
PY
echo "published $WORK/results.md into docs/benchmarks.md, README.md and docs/"
