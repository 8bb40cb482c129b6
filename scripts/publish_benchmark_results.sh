#!/usr/bin/env bash
# Copy the benchmark results files (written by benchmarks/quality.py and benchmarks/speed.py)
# between the README's markers, so the tables there are the ones the benchmarks wrote.
#   bash scripts/publish_benchmark_results.sh [RESULTS_DIR]   (default: benchmarks/results)
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-benchmarks/results}
python3 - "$RESULTS" <<'PY'
import sys
from pathlib import Path

results = Path(sys.argv[1])
readme = Path("README.md").read_text()
published = []
for name, extra in (("quality", "\n![dev loss versus updates](benchmarks/results/quality_dev_loss.png)\n"), ("speed", "")):
    source = results / f"{name}.md"
    begin, end = f"<!-- {name}-results:begin -->", f"<!-- {name}-results:end -->"
    if not source.is_file():
        print(f"no {source}: run benchmarks/{name}.py first (README section left as it is)", file=sys.stderr)
        continue
    if begin not in readme or end not in readme:
        sys.exit(f"README.md has no {name}-results markers")
    head, rest = readme.split(begin, 1)
    _, tail = rest.split(end, 1)
    text = ("\n" + source.read_text()).replace("\n### ", "\n#### ").lstrip("\n")
    readme = head + begin + "\n" + text.rstrip("\n") + "\n" + (extra if (results / "quality_dev_loss.png").is_file() or not extra else "") + end + tail
    published.append(str(source))
Path("README.md.tmp").write_text(readme)
Path("README.md.tmp").replace("README.md")
print("published into README.md:", ", ".join(published) or "nothing")
PY
