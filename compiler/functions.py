"""The functions a `.cnn` expression may call: `max(a, b)`, `make_divisible(c * 0.75, 8)`, ...

Each takes numbers (`len` a tuple) and returns a number; widths of MobileNet, EfficientNet and RegNet come from
a multiplier and a divisibility rule, so the network file can say how a width is computed
instead of holding the result typed by hand.

    max(a, b, ...)  min(a, b, ...)  abs(x)
    round(x)                       the nearest integer, halves to even (Python's round)
    floor(x)  ceil(x)              integers
    len(t)                         the number of items of a tuple or a size
    make_divisible(v, d=8, least=d)
                                   torchvision's rule for channel counts: v rounded to the
                                   nearest multiple of d (halves up), at least `least`, and not
                                   below 0.9·v (one more d then)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable


def make_divisible(v, d=8, least=None) -> int:
    if not isinstance(d, int) or d < 1:
        raise ValueError("its divisor must be a positive integer")
    least = d if least is None else least
    new = max(least, int(v + d / 2) // d * d)
    if new < 0.9 * v:  # rounding down must not lose more than 10%
        new += d
    return new


@dataclass(frozen=True)
class Function:
    least: int  # fewest arguments
    most: int | None  # most (None: any number)
    fn: Callable
    usage: str
    sequence: bool = False  # its arguments are tuples or sizes, not numbers


FUNCTIONS = {
    "max": Function(2, None, lambda *a: max(a), "max(a, b, ...)"),
    "min": Function(2, None, lambda *a: min(a), "min(a, b, ...)"),
    "abs": Function(1, 1, abs, "abs(x)"),
    "round": Function(1, 1, round, "round(x)"),
    "floor": Function(1, 1, math.floor, "floor(x)"),
    "ceil": Function(1, 1, math.ceil, "ceil(x)"),
    "len": Function(1, 1, len, "len(t)", sequence=True),
    "make_divisible": Function(1, 3, make_divisible, "make_divisible(v, d=8, least=d)"),
}
