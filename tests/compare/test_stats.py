"""The comparison's statistics against published numbers: a t table and Welch's worked examples."""

from __future__ import annotations

import math
import statistics

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ssl_vit.compare.stats import summarize, t_quantile, welch

# Two-sided 95% critical values of Student's t, as printed in any t table (e.g. NIST/SEMATECH
# e-Handbook, section 1.3.6.7.2): df -> t(0.975, df).
T_TABLE_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 29: 2.045}


@pytest.mark.parametrize("df, expected", sorted(T_TABLE_975.items()))
def test_t_quantile__matches_the_printed_t_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)


@pytest.mark.parametrize("values", [[37.5, 38.4], [33.1, 33.9, 32.6], [46.2, 46.9, 45.8, 46.4, 47.0]])
def test_summarize__mean_std_and_interval_equal_the_textbook_formula(values):
    s = summarize(values)
    n = len(values)
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    half = T_TABLE_975[n - 1] * sd / math.sqrt(n)
    assert s.n == n and s.mean == pytest.approx(mean) and s.std == pytest.approx(sd)
    assert s.ci_low == pytest.approx(mean - half, abs=1e-3) and s.ci_high == pytest.approx(mean + half, abs=1e-3)


def test_summarize__one_value_has_no_spread_or_interval():
    s = summarize([42.0])
    assert (s.n, s.mean, s.std, s.ci_low, s.ci_high) == (1, 42.0, None, None, None)


# Wikipedia, "Welch's t-test", Examples 1 and 2 (Welch: t, df, p as published there).
A1 = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
A2 = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]
B1 = [17.2, 20.9, 22.6, 18.1, 21.7, 21.4, 23.5, 24.2, 14.7, 21.8]
B2 = [21.5, 22.8, 21.0, 23.0, 21.6, 23.6, 22.5, 20.7, 23.4, 21.8, 20.7, 21.7, 21.5, 22.5, 23.6, 21.5, 22.5, 23.5,
      21.5, 21.8]


@pytest.mark.parametrize("a, b, t, df, p", [(A1, A2, -2.46, 24.99, 0.021), (B1, B2, -1.57, 9.90, 0.149)])
def test_welch__reproduces_the_published_worked_examples(a, b, t, df, p):
    result = welch(a, b)
    assert result is not None
    assert result.t == pytest.approx(t, abs=0.005) and result.df == pytest.approx(df, abs=0.01)
    assert result.p == pytest.approx(p, abs=0.0005)


def test_welch__needs_two_runs_on_each_side():
    assert welch([1.0], [2.0, 3.0]) is None and welch([1.0, 2.0], [3.0]) is None


def test_welch__is_undefined_when_neither_side_has_spread():
    assert welch([5.0, 5.0], [5.0, 5.0]) is None and welch([5.0, 5.0], [6.0, 6.0]) is None
    assert welch([5.0, 5.0], [6.0, 7.0]) is not None  # one side's spread is enough


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 100), min_size=2, max_size=6), st.lists(st.floats(0, 100), min_size=2, max_size=6))
@example([0.0, 0.0], [0.0, 2.918816670305795e-150])  # found by hypothesis in a full run: df was 0 / 0
def test_welch__is_symmetric_and_p_is_a_probability(a, b):
    ab, ba = welch(a, b), welch(b, a)
    assert (ab is None) == (ba is None)
    if ab is not None and ba is not None:
        assert 0.0 <= ab.p <= 1.0 and ab.p == pytest.approx(ba.p)
