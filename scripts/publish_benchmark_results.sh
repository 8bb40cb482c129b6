#!/usr/bin/env bash
# Copy the results files of the speed and cost_languages benchmarks into their generated sections
# of docs/benchmarks.md, so the tables there are the ones the benchmarks wrote. (The quality
# benchmark publishes its own report, generated from its records:
# python -m benchmarks.quality --report-only --publish.)
#   bash scripts/publish_benchmark_results.sh [RESULTS_DIR]   (default: benchmarks/results)
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-benchmarks/results}
python3 - "$RESULTS" <<'PY'
import sys
from pathlib import Path

from benchmarks.common import replace_between

results = Path(sys.argv[1])

page_path = Path("docs/benchmarks.md")
published = []
# the results files' headings are "###": they sit under the page's "## Speed and memory" /
# "## Cost against the number of languages"
for name in ("speed", "cost_languages"):
    source = results / f"{name}.md"
    if not source.is_file():
        print(f"no {source}: run python -m benchmarks.{name} first ({page_path} section left as it is)", file=sys.stderr)
        continue
    text = source.read_text().lstrip("\n").rstrip("\n") + "\n"
    replace_between(page_path, f"{name.replace('_', '-')}-results", text)
    published.append(str(source))
print(f"published into {page_path}:", ", ".join(published) or "nothing")
PY
