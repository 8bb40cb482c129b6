"""Generated sections of the README and docs pages: the text between ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->`` is replaced by what a benchmark or the demo wrote, never typed by hand.
Used by benchmarks/planted_truth.py and scripts/publish_*_results.sh."""
import json
import sys
from pathlib import Path


def replace_between(path, name: str, text: str) -> None:
    """Replace what lies between the ``name`` markers of ``path`` (atomically); a page without
    the markers is an error that names it, and is left as it was."""
    path = Path(path)
    page = path.read_text()
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in page or end not in page:
        sys.exit(f"{path} has no {name} markers")
    head, rest = page.split(begin, 1)
    _, tail = rest.split(end, 1)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(head + begin + "\n" + text.rstrip("\n") + "\n" + end + tail)
    tmp.replace(path)


def print_results_markdown(parser, results_json: str, markdown) -> None:
    """A benchmark's ``--markdown JSON``: print the markdown ``markdown(results)`` of an existing
    results file (a missing file is a usage error that names it)."""
    path = Path(results_json)
    if not path.is_file():
        parser.error(f"--markdown: {path} not found (run the benchmark first)")
    sys.stdout.write(markdown(json.loads(path.read_text())))
