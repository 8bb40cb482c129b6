#!/usr/bin/env bash
# Copy a finished demo run's results into docs/ and between the README's result markers, so the
# numbers in the README are the ones the run wrote (never typed by hand).
#   bash scripts/publish_demo_results.sh [WORK_DIR]   (default: work/demo_quick)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-work/demo_quick}
[ -f "$WORK/results.md" ] || { echo "no $WORK/results.md: run examples/speech_to_text_gdps/run_demo.sh first" >&2; exit 1; }
mkdir -p docs
cp "$WORK/results.md" docs/demo_results.md
cp "$WORK/learning_curve.png" docs/demo_learning_curve.png
for png in similarity dendrogram layer_profile; do
  [ -f "$WORK/gdps/analysis/$png.png" ] && cp "$WORK/gdps/analysis/$png.png" "docs/demo_analysis_$png.png"
done
cp "$WORK/gdps/analysis/report.md" docs/demo_analysis_report.md
python3 - "$WORK/results.md" <<'PY'
import re, sys
results = open(sys.argv[1]).read().replace("# Demo results", "### Demo results", 1).replace("\n## ", "\n#### ")
readme = open("README.md").read()
begin, end = "<!-- demo-results:begin -->", "<!-- demo-results:end -->"
if begin not in readme:
    sys.exit("README.md has no demo-results markers")
head, rest = readme.split(begin, 1)
_, tail = rest.split(end, 1)
open("README.md.tmp", "w").write(head + begin + "\n" + results + "\n![learning curve](docs/demo_learning_curve.png)\n" + end + tail)
PY
mv README.md.tmp README.md
echo "published $WORK/results.md into README.md and docs/"
