"""`--rounds N`: the same targets measured N times over, for a difference of a few percent that one run on a
shared box cannot show (CPU µs and req/s move by ±15% between runs of the same build there).

Each round measures every target once, forwards in the first round, backwards in the second and so on, so
that each is measured about as often early in a round as late (exactly, for an even count), where the
box's drift would favour one side. A
target's figures are its middle round's; a ratio is the median of the ratios taken within each round,
between runs seconds apart, so that a slow spell of the box weighs on both sides of most ratios. Pure: the
harness measures, this only orders and combines.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def orders(names: Sequence[str], rounds: int) -> list[list[str]]:
    """The order each round measures `names` in: as given, then reversed, and so on."""
    return [list(names) if i % 2 == 0 else list(reversed(names)) for i in range(rounds)]


def middle(runs: Sequence[T], key: Callable[[T], float]) -> T:
    """The run whose `key` is the median (the lower of the two middle ones for an even count): one real
    run, so that its figures stay consistent with each other."""
    return sorted(runs, key=key)[(len(runs) - 1) // 2]


def combine(per_round: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Each pair's ratios over the rounds that measured both sides: the median of each figure that every
    one of those rounds has, and the lowest and highest req/s ratio seen (`rps_min`, `rps_max`) with how
    many rounds (`rounds`)."""
    pairs: dict[str, list[dict[str, float]]] = {}
    for ratios in per_round:
        for pair, figures in ratios.items():
            pairs.setdefault(pair, []).append(figures)
    out: dict[str, dict[str, float]] = {}
    for pair, seen in pairs.items():
        keys = set.intersection(*(set(figures) for figures in seen))
        combined = {key: statistics.median(figures[key] for figures in seen) for key in sorted(keys)}
        combined["rps_min"] = min(figures["rps"] for figures in seen)
        combined["rps_max"] = max(figures["rps"] for figures in seen)
        combined["rounds"] = len(seen)
        out[pair] = combined
    return out
