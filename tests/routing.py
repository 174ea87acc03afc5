"""A fixed routing table for tests that follow both sides of the torch-kernel threshold:
the crossovers measured on the development machine before they were measured per process
(route.py, crossover.py), so that which route a test's shape takes does not depend on the
machine's timings. Keys are (mode, family) as in crossover.OVERRIDE, and ("fold",) for every row length."""

from batchnorm import crossover

TOP = crossover.TOP
TABLE = {
    ("eval", "rows"): TOP + 1,
    ("eval", "maps"): TOP + 1,
    ("eval", "folded"): TOP + 1,
    ("train, recorded", "rows"): TOP + 1,
    ("train, recorded", "maps"): (1 << 17) + 1,
    ("train, recorded", "folded"): 1 << 15,
    ("train", "rows"): TOP + 1,
    ("train", "maps"): 1 << 15,
    ("train", "folded"): 1 << 15,
    ("fold",): 1 << 15,  # launch.folds: short rows fold below 32 KiB of columns
}
