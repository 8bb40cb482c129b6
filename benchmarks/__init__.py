"""The project's benchmarks and the results they recorded (``benchmarks/results/``).

Each benchmark is a module of this package, run from the repository root as
``python -m benchmarks.<name> ...``: ``quality``, ``speed``, ``scale``, ``cost_languages`` and
``planted_truth``. What they share (machine and versions, results files, generated sections of
the docs, manifests) is in ``common``.
"""
