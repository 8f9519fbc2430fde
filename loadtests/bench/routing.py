"""What one routing decision costs, measured in every bench run (the request path pays it per request)."""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

from gateway.release.routing import Split, route_point


def routing_cost(keys: int = 100_000, repeats: int = 5) -> dict[str, Any]:
    """Microseconds per routing decision and per key hash alone: medians of `repeats` passes over `keys` keys.

    The split is a sticky 10% canary (so every call hashes its key); each key is a distinct string.
    Includes the Python loop around each call (about 0.02 us), as the request path pays it too.
    """
    names = [f"user-{i}" for i in range(keys)]
    split = Split("1", "2", 1000)
    rng = random.Random(0)
    choose, hash_only = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for key in names:
            split.choose(key, rng)
        choose.append((time.perf_counter() - start) / keys * 1e6)
        start = time.perf_counter()
        for key in names:
            route_point(key)
        hash_only.append((time.perf_counter() - start) / keys * 1e6)
    canary = sum(split.choose(key, rng)[1] == "canary" for key in names)
    return {
        "choose_us": statistics.median(choose),
        "route_point_us": statistics.median(hash_only),
        "choose_us_range": [min(choose), max(choose)],
        "route_point_us_range": [min(hash_only), max(hash_only)],
        "keys": keys,
        "repeats": repeats,
        "canary_weight_bp": split.canary_weight_bp,
        "canary_share": canary / keys,
    }
