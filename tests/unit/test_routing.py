"""Routing is sticky, monotone and exact (release.md)."""

from __future__ import annotations

import random

import pytest

from gateway.release.routing import Split, route_point

KEYS = [f"user-{i}" for i in range(10_000)]


def canary_keys(split: Split) -> set[str]:
    rng = random.Random(0)
    return {k for k in KEYS if split.choose(k, rng)[1] == "canary"}


@pytest.mark.parametrize("weight_bp", [100, 1000, 2500, 5000, 9000])
def test_share_of_distinct_keys_is_the_weight_within_one_point(weight_bp: int) -> None:
    share = len(canary_keys(Split("1", "2", weight_bp))) / len(KEYS)
    assert abs(share - weight_bp / 10_000) <= 0.01


def test_raising_the_weight_keeps_every_canary_key_on_the_canary() -> None:
    previous: set[str] = set()
    for weight_bp in (100, 500, 1000, 2500, 5000, 10_000):
        current = canary_keys(Split("1", "2", weight_bp))
        assert previous <= current
        previous = current
    assert len(previous) == len(KEYS)


def test_a_key_always_gets_the_same_version() -> None:
    split = Split("1", "2", 3000)
    rng = random.Random(1)
    for key in KEYS[:500]:
        assert len({split.choose(key, rng) for _ in range(3)}) == 1


def test_no_canary_or_zero_weight_routes_everything_to_stable() -> None:
    rng = random.Random(2)
    assert all(Split("1").choose(k, rng) == ("1", "stable") for k in KEYS[:100])
    assert all(Split("1", "2", 0).choose(k, rng) == ("1", "stable") for k in KEYS[:100])


def test_keyless_requests_split_by_weight_at_random() -> None:
    rng = random.Random(3)
    split = Split("1", "2", 2000)
    share = sum(split.choose(None, rng)[1] == "canary" for _ in range(20_000)) / 20_000
    assert abs(share - 0.2) < 0.02


def test_points_are_uniform_in_unit_interval() -> None:
    points = [route_point(k) for k in KEYS]
    assert all(0.0 <= p < 1.0 for p in points)
    deciles = [0] * 10
    for p in points:
        deciles[int(p * 10)] += 1
    assert all(900 <= d <= 1100 for d in deciles)
