"""The plugin's worker pools for pure, file-to-result tasks (feature extraction, segment cutting,
speech synthesis, Arabic diacritisation).

Start method. Not ``fork``: these pools are started from processes that have already run torch,
OpenMP or other threaded code (a test session, a notebook, the recipes' own steps); a child forked
from a multi-threaded process can inherit a lock held by another thread and die or hang.
``forkserver`` forks the workers from a clean single-threaded server instead; ``spawn`` where it is
not available. The server imports the workers' modules once (``PRELOAD``; importing
``fairseq_gdps`` imports fairseq and torch, seconds per process), so that a pool that starts a
fresh worker per task (speech synthesis: hundreds of workers per corpus) does not pay the imports
in every worker. One list for every pool: a process has one fork server, started by its first
pool, and only that start reads the list.

Stopping early. A caller that stops reading results (the first bad utterance without
``--skip-bad``) used to leave its ``multiprocessing.Pool`` inside a suspended generator, to be torn
down whenever the generator was closed, by ``Pool.terminate`` with tasks in flight (workers killed
while they may hold the task queue's lock). A CI run hung for over an hour in exactly that test
(prep stopping at a bad sample rate); the deadlock did not reproduce here. :func:`parallel_map`
therefore uses ``concurrent.futures.ProcessPoolExecutor`` inside a ``with`` block of the caller:
leaving the block cancels the tasks not yet started, lets the running ones finish and joins the workers,
without signals; a worker that dies raises ``BrokenProcessPool`` instead of a wait for ever.
Speech synthesis keeps ``multiprocessing.Pool`` for ``maxtasksperchild=1`` (a fresh espeak-ng per
chunk) and reads every result inside its own ``with`` block."""
import contextlib
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterator, Sequence

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


@contextlib.contextmanager
def parallel_map(fn: Callable, tasks: Sequence, jobs: int, max_chunk: int = 16) -> Iterator[Iterator]:
    """``with parallel_map(fn, tasks, jobs) as results:`` iterates over ``fn(task)`` in the order
    of ``tasks``, computed by ``jobs`` worker processes (in this process when ``jobs`` <= 1 or
    there is a single task). ``fn`` must be a module-level function. Leaving the block, normally
    or by an exception, stops the workers before the block's caller goes on (module docstring)."""
    if jobs <= 1 or len(tasks) <= 1:
        yield map(fn, tasks)
        return
    jobs = min(jobs, len(tasks))
    # chunks amortise the inter-process round trip; about 8 per worker keeps the load balanced
    chunk = max(1, min(max_chunk, len(tasks) // (jobs * 8) or 1))
    executor = ProcessPoolExecutor(max_workers=jobs, mp_context=pool_context())
    try:
        yield executor.map(fn, tasks, chunksize=chunk)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
