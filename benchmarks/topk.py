"""Dynamic top-k attention (``topk``) against SDPA: time and peak memory, forward and forward+backward.

``topk`` must look at every score to find each query's largest ones, so its selection costs
one ``T×S`` GEMM plus ``torch.topk``; what it saves is the softmax, the value product and the
backward, which touch only ``k`` keys per query. Results go to ``benchmarks/results/topk.*``.

Run::

    ATTNKIT_BENCH_LOCK=/tmp/attnkit-quiet.lock .venv-bench/bin/python -m benchmarks.topk --lengths 1024 2048 4096 8192
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Sequence

from benchmarks import harness
from benchmarks.harness import Case, run_suite

CASES = [
    Case("sdpa", "benchmarks.common:sdpa", role="sdpa"),
    Case("attnkit topk k=64", "benchmarks.common:attnkit_mechanism", {"name": "topk", "topk": 64}),
    Case("attnkit topk k=256", "benchmarks.common:attnkit_mechanism", {"name": "topk", "topk": 256}),
]


def patient_measurements(time_budget: float) -> None:
    """Let a measurement run ``time_budget`` seconds before it cuts its repeats short.

    The harness's default budget (120 s over 5 repeats) ends a measurement whose warm-up step
    alone takes over 24 s before any timed step, which on a loaded shared machine turns long
    cells into errors ("no median for empty data"). Until ``run_suite`` accepts a budget, the
    suite passes one to :func:`benchmarks.harness.measure` here.
    """
    harness.measure = functools.partial(harness.measure, time_budget=time_budget)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per measurement (after warm-up)")
    parser.add_argument("--name", default="topk", help="results file stem under benchmarks/results/")
    parser.add_argument("--time-budget", type=float, default=400.0, help="seconds per measurement before fewer repeats")
    args = parser.parse_args(argv)
    patient_measurements(args.time_budget)
    run_suite(args.name, CASES, lengths=args.lengths, repeats=args.repeats)


if __name__ == "__main__":
    main()
