"""The start method of the plugin's worker pools for pure, file-to-result tasks (feature
extraction, segment cutting, speech synthesis, Arabic diacritisation).

Why not ``fork``: these pools are started from processes that have already run torch, OpenMP or
other threaded code (a test session, a notebook, the recipes' own steps); a child forked from a
multi-threaded process can inherit a lock held by another thread and die or hang, and
``multiprocessing.Pool`` then waits forever for the lost task. ``forkserver`` forks the workers
from a clean single-threaded server instead; ``spawn`` where it is not available.

``preload`` names modules the server imports once, so that a pool that starts a fresh worker per
task (speech synthesis: ``maxtasksperchild=1``) does not pay the imports in every worker. It only
takes effect when this process' fork server is not running yet; without it the workers import
the same modules themselves, so results never depend on it."""
import multiprocessing
from typing import Sequence


def pool_context(preload: Sequence[str] = ()):
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" not in methods:
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    if preload:
        ctx.set_forkserver_preload(list(preload))
    return ctx
