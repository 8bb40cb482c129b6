"""The worker pools: results in order, errors raised in the caller, and a caller that stops
reading early leaves no worker behind (the CI hang in the prep test that stops at a bad line)."""
import math
import multiprocessing
import time

import pytest

from fairseq_gdps.process_pool import parallel_map


@pytest.mark.parametrize("jobs", [1, 2])
def test_results_in_task_order(jobs):
    tasks = list(range(-40, 40))
    with parallel_map(abs, tasks, jobs) as results:
        assert list(results) == [abs(t) for t in tasks]
    assert multiprocessing.active_children() == []


def test_worker_error_reaches_the_caller_and_stops_the_workers():
    with pytest.raises(ValueError, match="math domain error"):
        with parallel_map(math.sqrt, [4.0] * 20 + [-1.0] + [9.0] * 20, 2) as results:
            list(results)
    assert multiprocessing.active_children() == []


def test_stopping_early_cancels_the_rest_and_joins_the_workers():
    tasks = [0.05] * 800  # 20 s of sleeping on 2 workers if the rest were not cancelled
    with parallel_map(time.sleep, tasks, 2, max_chunk=1) as results:
        for i, _ in enumerate(results):
            if i == 0:
                t0 = time.time()  # the workers are up: their start-up (imports) is not what is measured
            if i == 3:
                break
    assert multiprocessing.active_children() == []
    assert time.time() - t0 < 10
