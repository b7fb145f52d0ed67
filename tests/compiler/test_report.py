"""The rewrite report of each tiny family: exactly the rewrites expected, nothing more (no-op counters aside)."""

import pytest

from tests.compiler.rewrite_utils import EXPECTED_REWRITES, NOOP_COUNTERS


@pytest.mark.parametrize("name", EXPECTED_REWRITES)
def test_report(families, name):
    report = families(name).program.report
    assert {k: v for k, v in report.items() if k not in NOOP_COUNTERS} == EXPECTED_REWRITES[name]
    assert all(isinstance(v, int) and v > 0 for v in report.values())
    assert list(report) == sorted(report)  # run_passes sorts it, as the manifest shows it
