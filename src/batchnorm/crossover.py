"""Below how many values torch's own CPU kernel beats the Numba kernels: measured on this
machine, once per process, for each kind of call that asks.

A Numba launch costs a fixed time (the Python around it, waking the OpenMP team) that
torch's kernel does not pay, and the kernels win it back per value; where the two cross
depends on the machine (cores, clock, caches) and on the call: evaluation or training,
with autograd recording or not, and the layout family (rows of one value, short rows
the folded kernels take, longer maps). So it is not a constant: the first call of a kind
with at most TOP values times both sides on inputs of that kind at each of SIZES
(interleaved, the fastest of ``repeat``), and the answer holds for the rest of the
process. All kinds together take well under a second; most programs ask for two or three.

The caller (route.py) hands over the two sides as functions of a value count, so that
what is timed is exactly what the route would run.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# the sizes measured, in values: 2^12 to 2^18 (16 KiB to 1 MiB of float32)
SIZES = tuple(1 << k for k in range(12, 19))
# above TOP values the kernels are taken without asking (the bench's every shape is larger)
TOP = SIZES[-1]
REPEAT = 5

# set (tests, or a user pinning the route): an int for every key, or a dict by the first two
# parts of a key, else by its first; no measurement for what it names
OVERRIDE: int | dict | None = None

_measured: dict[tuple, int] = {}


def crossover(times: dict[int, tuple[float, float]], top: int = TOP) -> int:
    """The threshold from ``{size: (ours' seconds, theirs')}`` (the kernels' and torch's): the
    smallest size from which ours is no slower at it and at every larger size measured, so
    that calls of fewer values take theirs; ``top`` + 1 when ours loses at the largest.
    """
    threshold = top + 1
    for size in sorted(times, reverse=True):
        ours, theirs = times[size]
        if ours > theirs:
            break
        threshold = size
    return threshold


def measure(
    ours: Callable[[int], Callable[[], object]],
    theirs: Callable[[int], Callable[[], object]],
    sizes=SIZES,
    repeat: int = REPEAT,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[int, tuple[float, float]]:
    """{size: (fastest of ``ours``, fastest of ``theirs``)}; each side is a function that
    prepares its input of ``size`` values and returns the call to time. One call each
    before timing (compilation, first touch), then alternating calls."""
    times = {}
    for size in sizes:
        calls = (ours(size), theirs(size))
        for call in calls:
            call()
        best = [float("inf"), float("inf")]
        for _ in range(repeat):
            for side, call in enumerate(calls):
                start = clock()
                call()
                best[side] = min(best[side], clock() - start)
        times[size] = (best[0], best[1])
    return times


def threshold(key: tuple, sides: Callable[[tuple], tuple], sizes=SIZES) -> int:
    """The threshold for calls of ``key``, measured the first time that key is asked for with
    the two sides ``sides(key)`` returns, (ours, theirs) as measure takes them, at ``sizes``."""
    if isinstance(OVERRIDE, int):
        return OVERRIDE
    if OVERRIDE is not None:  # a kind the dict does not name is measured
        pinned = OVERRIDE.get(key[:2], OVERRIDE.get(key[:1]))
        if pinned is not None:
            return pinned
    found = _measured.get(key)
    if found is None:
        found = _measured[key] = crossover(measure(*sides(key), sizes=sizes), sizes[-1])
    return found


def measured() -> dict[tuple, int]:
    """What this process has measured so far, by key (for the bench's machine line)."""
    return dict(_measured)
