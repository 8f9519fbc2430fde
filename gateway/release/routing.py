"""Weighted, sticky, monotone choice between the stable and the canary version.

A routing key hashes to a point u in [0, 1); the canary serves u < weight.
Because the point of a key never changes, raising the weight only adds keys
to the canary and lowering it only removes them: no key flips back and forth
while a rollout moves forward. With a good hash, the share of distinct keys
on the canary is the weight, up to sampling noise.

Pure: no I/O, and the randomness for keyless requests is injected.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Literal

from gateway.types import BASIS_POINTS

# "rule": a routing rule chose the version (gateway.release.rules), not the split.
Role = Literal["stable", "canary", "pinned", "shadow", "rule"]
_SCALE = float(1 << 64)


def route_point(key: str) -> float:
    """The key's fixed point in [0, 1)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


@dataclass(frozen=True, slots=True)
class Split:
    stable: str
    canary: str = ""
    canary_weight_bp: int = 0

    def choose(self, key: str | None, rng: random.Random) -> tuple[str, Role]:
        """The version serving this key, and its role."""
        if not self.canary or self.canary_weight_bp <= 0:
            return self.stable, "stable"
        u = route_point(key) if key else rng.random()
        if u * BASIS_POINTS < self.canary_weight_bp:
            return self.canary, "canary"
        return self.stable, "stable"
