"""The start method of the plugin's worker pools for pure, file-to-result tasks (feature
extraction, segment cutting).

Why not ``fork``: these pools are started from processes that have already run torch, OpenMP or
other threaded code (a test session, a notebook, the recipes' own steps); a child forked from a
multi-threaded process can inherit a lock held by another thread and die or hang, and
``multiprocessing.Pool`` then waits forever for the lost task. ``forkserver`` forks the workers
from a clean single-threaded server instead; ``spawn`` where it is not available."""
import multiprocessing


def pool_context():
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
