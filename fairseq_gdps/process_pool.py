"""The start method of the plugin's worker pools for pure, file-to-result tasks (feature
extraction, segment cutting, speech synthesis, Arabic diacritisation).

Why not ``fork``: these pools are started from processes that have already run torch, OpenMP or
other threaded code (a test session, a notebook, the recipes' own steps); a child forked from a
multi-threaded process can inherit a lock held by another thread and die or hang, and
``multiprocessing.Pool`` then waits forever for the lost task. ``forkserver`` forks the workers
from a clean single-threaded server instead; ``spawn`` where it is not available.

The server imports the workers' modules once (``PRELOAD``; importing ``fairseq_gdps`` imports
fairseq and torch, seconds per process), so that a pool that starts a fresh worker per task
(speech synthesis: ``maxtasksperchild=1``, hundreds of workers per corpus) does not pay the
imports in every worker. One list for every pool: a process has one fork server, started by its
first pool, and only that start reads the list."""
import multiprocessing

PRELOAD = ("fairseq_gdps.data.speech_synthesis", "fairseq_gdps.data.features", "scipy.signal")


def pool_context():
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" not in methods:
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # "__main__" (multiprocessing's default preload) too: otherwise every worker imports the
    # calling script, and what it imports, again
    ctx.set_forkserver_preload(["__main__", *PRELOAD])
    return ctx
