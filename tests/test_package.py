"""The package's shape: imports run downward only (the math knows nothing of fairseq), and importing
the plugin keeps torch's weights-only loading on and fairseq's tensorboardX hint quiet."""
import argparse
import ast
import pickle
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import BIN

PACKAGE = Path(__file__).resolve().parents[1] / "fairseq_gdps"

# lower layers never import higher ones; a package may import its own layer's modules
LAYER = {"atomic": 0, "process_pool": 0, "net_input": 0, "data": 1, "scoring": 1, "gdps": 2, "modules": 3,
         "models": 4, "criterions": 5, "tasks": 5, "cli": 6}
FAIRSEQ_FREE = {"atomic", "process_pool", "net_input", "data", "scoring", "gdps"}


def imported_modules(path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the package uses absolute ones)"
            yield node.module


def test_imports_run_downward_and_the_math_knows_nothing_of_fairseq():
    upward, fairseq_in_math = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if parts == ("__init__.py",):
            continue   # the package's registration imports everything
        own = parts[0].removesuffix(".py")
        for module in imported_modules(path):
            top = module.split(".")
            if top[0] == "fairseq_gdps" and len(top) > 1 and LAYER[top[1]] > LAYER[own]:
                upward.append(f"{path.relative_to(PACKAGE)} imports {module}")
            if top[0] in ("fairseq", "fairseq_cli") and own in FAIRSEQ_FREE:
                fairseq_in_math.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not upward
    assert not fairseq_in_math
    assert set(LAYER) == {p.name.removesuffix(".py") for p in PACKAGE.iterdir()
                          if p.name != "__init__.py" and (p.suffix == ".py" or (p / "__init__.py").is_file())}


class NotPlainData:
    pass


def test_weights_only_loading_stays_on_and_takes_fairseq_checkpoints(tmp_path):
    import fairseq_gdps  # noqa: F401

    torch.save({"args": argparse.Namespace(arch="s2t"), "model": {"w": torch.ones(2)}}, tmp_path / "ckpt.pt")
    assert torch.load(tmp_path / "ckpt.pt")["args"].arch == "s2t"
    torch.save({"model": NotPlainData()}, tmp_path / "other.pt")
    with pytest.raises(pickle.UnpicklingError, match="NotPlainData"):
        torch.load(tmp_path / "other.pt")


def test_the_plugins_commands_print_no_tensorboardx_hint():
    out = subprocess.run([BIN / "gdps-split-checkpoint", "--help"], capture_output=True, text=True, check=True)
    assert "usage" in out.stdout and "tensorboardX" not in out.stdout + out.stderr
