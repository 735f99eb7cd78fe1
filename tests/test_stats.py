"""One percentile definition: the standard inclusive one, shared by analytics and the simulator."""

from __future__ import annotations

import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from callray.consumers.analytics import Window
from callray.sim.report import describe
from callray.stats import percentile

samples = st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=2, max_size=300)


@given(samples)
def test_percentile_is_the_inclusive_quantile_of_the_standard_library(values):
    ordered = sorted(values)
    cuts = statistics.quantiles(ordered, n=100, method="inclusive")
    for q in (1, 50, 90, 99):
        assert percentile(ordered, q / 100) == pytest.approx(cuts[q - 1], rel=1e-9, abs=1e-9)


@given(samples)
def test_live_analytics_and_the_simulator_report_the_same_figures(values):
    window = Window(size=len(values))
    for value in values:
        window.add(value)
    summary, described = window.summary(), describe(values)
    for key in ("p50", "p90", "p99"):
        assert summary[key] == pytest.approx(described[key], abs=0.01)


def test_percentile_refuses_what_has_none():
    with pytest.raises(ValueError, match="no values"):
        percentile([], 0.5)
    with pytest.raises(ValueError, match="within 0..1"):
        percentile([1.0], 99)
    assert percentile([7.0], 0.99) == 7.0
