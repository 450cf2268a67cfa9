"""What a config field accepts, declared next to its default.

    epochs: int = setting(10, at_least(1), "passes over the training data")
    mask_ratio: float = setting(0.75, between(0, 1, open=True), "the fraction of patches masked")

`ssl_vit.config` checks every value against its field's rule when a config is read (before any
data, model or output folder is touched), raises `ConfigError` naming the key, the value, what is
accepted and the fix, and `--help` shows the rule beside each default. Choices are `Literal` types.
`None` is accepted wherever the field's type is Optional (it means "off" or "automatic").
Fixed-length lists (tuple fields) name a rule per item:

    crop_scale: tuple[float, float] = setting((0.4, 1.0), span(Range(0, 1, low_open=True)), "crop area")
    jitter: tuple[float, float] = setting((0.4, 0.1), items(non_negative(), between(0, 0.5)), "strength, hue")
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

__all__ = [
    "Each", "Items", "Range", "at_least", "between", "each", "items", "non_negative", "positive", "probability", "rule_of",
    "setting", "span",
]


@dataclass(frozen=True)
class Range:
    """A number in an interval; `low` / `high` None: unbounded on that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def accepts(self, value: Any) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self, integer: bool) -> str:
        kind = "an integer" if integer else "a number"
        low = None if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        high = None if self.high is None else f"{'<' if self.high_open else '<='} {self.high:g}"
        if low and high:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{kind} in {left}{self.low:g}, {self.high:g}{right}"
        return f"{kind} {low or high}" if (low or high) else kind

    def outside(self, integer: bool) -> list[Any]:
        """Values this rule refuses (for tests): just past each bound."""
        step = 1 if integer else 1e-3
        out = []
        if self.low is not None:
            out.append(self.low if self.low_open else self.low - step)
        if self.high is not None:
            out.append(self.high if self.high_open else self.high + step)
        return [int(v) if integer else float(v) for v in out]


@dataclass(frozen=True)
class Each:
    """Every item of a list (or tuple) follows `rule`."""

    rule: Range

    def accepts(self, value: Any) -> bool:
        return isinstance(value, (list, tuple)) and all(self.rule.accepts(v) for v in value)

    def describe(self, integer: bool) -> str:
        return f"a list of {self.rule.describe(integer).replace('an integer', 'integers').replace('a number', 'numbers')}"

    def outside(self, integer: bool) -> list[Any]:
        return [[v] for v in self.rule.outside(integer)]


@dataclass(frozen=True)
class Items:
    """A list (or tuple) of exactly len(rules) numbers, the i-th within rules[i]; `ordered`: each <= the next."""

    rules: tuple[Range, ...]
    ordered: bool = False

    def accepts(self, value: Any) -> bool:
        if not isinstance(value, (list, tuple)) or len(value) != len(self.rules):
            return False
        if not all(rule.accepts(v) for rule, v in zip(self.rules, value)):
            return False
        return not self.ordered or all(a <= b for a, b in pairwise(value))

    def describe(self, integer: bool) -> str:
        n = len(self.rules)
        if len(set(self.rules)) == 1:
            each_item = self.rules[0].describe(integer).replace("an integer", "integers").replace("a number", "numbers")
            text = f"a list of {n} {each_item}"
        else:
            text = f"a list of {n}: " + ", ".join(rule.describe(integer) for rule in self.rules)
        if self.ordered:
            text += ", low <= high" if n == 2 else ", each <= the next"
        return text

    def outside(self, integer: bool) -> list[Any]:
        """Lists this rule refuses (for tests): every item just past one item rule's bound."""
        return [[v] * len(self.rules) for rule in dict.fromkeys(self.rules) for v in rule.outside(integer)]


def at_least(low: float) -> Range:
    return Range(low=low)


def positive() -> Range:
    return Range(low=0, low_open=True)


def non_negative() -> Range:
    return Range(low=0)


def probability() -> Range:
    return Range(low=0, high=1)


def between(low: float, high: float, open: bool = False) -> Range:  # noqa: A002 - reads as English
    return Range(low=low, high=high, low_open=open, high_open=open)


def each(rule: Range) -> Each:
    return Each(rule)


def items(*rules: Range) -> Items:
    """A fixed-length list, one rule per item: items(non_negative(), between(0, 0.5))."""
    return Items(tuple(rules))


def span(rule: Range) -> Items:
    """[low, high], both within `rule`, low <= high (a range of scales or of aspect ratios)."""
    return Items((rule, rule), ordered=True)


def setting(default: Any, rule: Range | Each | Items, meaning: str = "") -> Any:
    """A dataclass field with `default` that accepts what `rule` allows; `meaning` goes into errors and --help."""
    metadata = {"accepts": rule, "meaning": meaning}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def rule_of(field: dataclasses.Field) -> tuple[Range | Each | Items | None, str]:
    """(rule, meaning) declared on a dataclass field, or (None, "")."""
    return field.metadata.get("accepts"), field.metadata.get("meaning", "")
