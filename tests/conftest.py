"""Shared fixtures: a tiny synthesised corpus and its fairseq data folder, built once per session."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Stock fairseq 0.12 without the plugin: its checkpoints pickle an argparse.Namespace, which torch's
# weights-only loading refuses unless allowed (the plugin allows that one class when imported).
STOCK_FAIRSEQ_ENV = ["env", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"]


def run(cmd, cwd=None, timeout=600):
    """Run a command with the venv's tools on PATH; fail the test with its output on error."""
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}", OMP_NUM_THREADS="2")
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
                    f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def one_thread():
    """Torch and BLAS on one thread for a module of tiny-tensor tests (restored after): on shared
    cores, several threads on tiny tensors can stall badly."""
    import torch
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    if os.environ.get("GDPS_TEST_CORPUS"):  # development shortcut: reuse a corpus folder
        return Path(os.environ["GDPS_TEST_CORPUS"])
    from fairseq_gdps.data.speech_synthesis import SynthesisUnavailable, resolve_backend

    try:
        resolve_backend("auto")
    except SynthesisUnavailable as e:  # the corpus is synthesised: without espeak-ng there is none
        pytest.skip(f"tiny_corpus needs espeak-ng to synthesise speech: {e} "
                    "(or set GDPS_TEST_CORPUS to an existing corpus folder)")
    out = tmp_path_factory.mktemp("tiny") / "corpus"
    run([BIN / "gdps-make-corpus", "--profile", "quick", "--utterances-per-language", "30",
         "--seed", "3", "--out", out])
    return out


@pytest.fixture(scope="session")
def tiny_data(tiny_corpus):
    out = tiny_corpus.parent / "data"
    run([BIN / "gdps-prep", "--corpus", tiny_corpus, "--out", out, "--vocab-size", "64"])
    return out
