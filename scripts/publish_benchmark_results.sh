#!/usr/bin/env bash
# Copy the benchmark results files (written by benchmarks/quality.py and benchmarks/speed.py)
# between the markers of docs/benchmarks.md, so the tables there are the ones the benchmarks wrote.
#   bash scripts/publish_benchmark_results.sh [RESULTS_DIR]   (default: benchmarks/results)
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-benchmarks/results}
python3 - "$RESULTS" <<'PY'
import sys
from pathlib import Path

results = Path(sys.argv[1])
page_path = Path("docs/benchmarks.md")
page = page_path.read_text()
published = []
# the results files' headings are "###": they sit under the page's "## Quality" / "## Speed and memory"
for name, extra in (("quality", "\n![dev loss versus updates](../benchmarks/results/quality_dev_loss.png)\n"), ("speed", "")):
    source = results / f"{name}.md"
    begin, end = f"<!-- {name}-results:begin -->", f"<!-- {name}-results:end -->"
    if not source.is_file():
        print(f"no {source}: run benchmarks/{name}.py first ({page_path} section left as it is)", file=sys.stderr)
        continue
    if begin not in page or end not in page:
        sys.exit(f"{page_path} has no {name}-results markers")
    head, rest = page.split(begin, 1)
    _, tail = rest.split(end, 1)
    text = source.read_text().lstrip("\n")
    page = head + begin + "\n" + text.rstrip("\n") + "\n" + (extra if (results / "quality_dev_loss.png").is_file() or not extra else "") + end + tail
    published.append(str(source))
tmp = page_path.with_name(page_path.name + ".tmp")
tmp.write_text(page)
tmp.replace(page_path)
print(f"published into {page_path}:", ", ".join(published) or "nothing")
PY
