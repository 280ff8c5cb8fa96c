"""The demo is a real, short run: a distilled flow map must beat the teacher's Euler solver at few steps."""

import math

import pytest

from fmm.jobs.demo import DemoConfig, format_rows, run_demo


@pytest.mark.slow
def test_short_demo_run_beats_euler_at_one_and_two_steps():
    rows = run_demo(DemoConfig(steps=200, batch=512, samples=1000), log=lambda *_: None)
    by_steps = {r.steps: r for r in rows}
    assert set(by_steps) == {0, 1, 2, 4, 8, 16}
    for n in (1, 2):
        assert by_steps[n].rmse_map < 0.5 * by_steps[n].rmse_euler
        assert by_steps[n].sw2_map < 0.5 * by_steps[n].sw2_euler
    assert all(math.isfinite(r.sw2_map) and math.isfinite(r.energy_map) for r in rows)
    assert "ODE" in format_rows(rows)
