"""What the benchmarks share: where the repository and the results are, the machine and software a
run was made on, paths as a results file records them, atomic results files, the generated
sections of the docs, and the tab-separated manifests that derived data folders are written in.

Results files are committed, so they record paths relative to the repository, never the absolute
paths of the machine that made them.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SPLITS = ("train", "dev", "test")


# ---------------------------------------------------------------------------------------------
# paths and commands as the results record them
# ---------------------------------------------------------------------------------------------
def portable_path(path) -> str:
    """``path`` relative to the repository (``work/...`` inside it, ``../...`` outside)."""
    return os.path.relpath(Path(path).resolve(), REPO)


def portable_args(args: Sequence) -> List[str]:
    """Command-line arguments with every absolute path made relative to the repository."""
    return [portable_path(a) if os.path.isabs(str(a)) else str(a) for a in args]


def command_line(module: str, argv: Optional[Sequence[str]]) -> str:
    """How a benchmark was started (``argv``: its arguments, None for the process's own)."""
    return "python " + shlex.join(["-m", f"benchmarks.{module}", *portable_args(sys.argv[1:] if argv is None else argv)])


# ---------------------------------------------------------------------------------------------
# machine and software
# ---------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor name elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_details() -> dict:
    """CPU, cores, memory, platform, Python, and the load average when the benchmark starts (the
    machine may be shared with other jobs, which slows every timing)."""
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        mem_gib = None
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_gib": mem_gib, "platform": platform.platform(),
            "python": platform.python_version(), "load_average_at_start": load}


def git_commit() -> Optional[str]:
    """The repository's commit (None outside a git checkout)."""
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or None


def software_versions() -> dict:
    """Python and the pinned packages (as the demo's fingerprint records them), fairseq's own
    version and the repository's commit: what two runs must share to be compared."""
    import fairseq

    from fairseq_gdps.data.fingerprint import software_versions as package_versions

    return {**package_versions(), "fairseq": fairseq.__version__, "git": git_commit()}


def configure_logging() -> None:
    """The benchmark's progress on stderr; fairseq's own logging only from warnings up."""
    logging.basicConfig(format="%(asctime)s | %(name)s | %(message)s", level=logging.INFO, stream=sys.stderr)
    for name in ("fairseq", "fairseq_gdps", "fairseq_cli", "matplotlib", "hydra"):
        logging.getLogger(name).setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------
# results files and the generated sections of the docs
# ---------------------------------------------------------------------------------------------
def write_json(path: Path, obj: dict) -> None:
    """A record: sorted keys, one file per run, written atomically."""
    from fairseq_gdps.atomic import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


def write_results(results: dict, out_dir: Path, name: str, markdown: Callable[[dict], str]) -> Dict[str, Path]:
    """``<out_dir>/<name>.json`` (the results, in the order measured) and ``<name>.md`` (their
    markdown), each written atomically."""
    from fairseq_gdps.atomic import atomic_write

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md"}
    with atomic_write(paths["json"]) as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    with atomic_write(paths["md"]) as f:
        f.write(markdown(results))
    return paths


def print_results_markdown(parser, results_json: str, markdown: Callable[[dict], str]) -> None:
    """A benchmark's ``--markdown JSON``: print the markdown of an existing results file (a missing
    file is a usage error that names it)."""
    path = Path(results_json)
    if not path.is_file():
        parser.error(f"--markdown: {path} not found (run the benchmark first)")
    sys.stdout.write(markdown(json.loads(path.read_text())))


def replace_between(path, name: str, text: str) -> None:
    """Replace the generated section ``name`` of a docs page, the text between its
    ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` markers (atomically): published numbers are
    the ones a benchmark wrote, never typed by hand. A page without the markers is an error that
    names it, and is left as it was."""
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


# ---------------------------------------------------------------------------------------------
# derived data folders
# ---------------------------------------------------------------------------------------------
def read_tsv(path):
    """A fairseq manifest: (its columns, its rows as dicts)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return reader.fieldnames, list(reader)


def write_tsv(path, fields, rows) -> None:
    """A fairseq manifest, written atomically."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def link_prepared_files(src: Path, out: Path) -> None:
    """Link every file of the prepared folder ``src`` but its manifests (features, SentencePiece
    model, config) into ``out``, whose manifests are derived from ``src``'s."""
    for name in os.listdir(src):
        if not name.endswith(".tsv") and not (out / name).exists():
            os.symlink((src / name).resolve(), out / name)
