from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))

# --- hypothesis: no per-example deadline -------------------------------------------------
# Hypothesis fails an example that takes over 200 ms by default; on a loaded 2-core machine
# (or CI sharing one) a pure decoder can take that long for reasons that are not ours, and
# the failure says nothing about the code. The "teammesh" profile drops the deadline and
# is loaded by default; HYPOTHESIS_PROFILE picks another one ("ci" derandomizes, so a CI
# failure replays exactly).
settings.register_profile("teammesh", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", parent=settings.get_profile("teammesh"), derandomize=True,
                          print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "teammesh"))

# --- scenario counts: hostile, chaos and fuzz tests say what they tried and lost ----------
# Each scenario calls ``scenario_report(name, tried=N, lost=M)``; the terminal summary
# prints one line per scenario, so a run shows its counts, not only dots.
_SCENARIOS: list[tuple[str, int, int, str]] = []


@pytest.fixture
def scenario_report():  # type: ignore[no-untyped-def]
    def report(name: str, *, tried: int, lost: int = 0, note: str = "") -> None:
        _SCENARIOS.append((name, tried, lost, note))

    return report


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    if not _SCENARIOS:
        return
    terminalreporter.section("scenarios: tried / lost")
    for name, tried, lost, note in _SCENARIOS:
        terminalreporter.write_line(f"{name:<48} tried {tried:>6}  lost {lost:>4}"
                                    + (f"  ({note})" if note else ""))


# --- skips fail the run (scripts/test sets TEAMMESH_FAIL_ON_SKIP=1) ----------------------
# A test may skip only if it carries ``@pytest.mark.machine_kind("why")``: something this
# machine kind cannot have (the README lists them). Any other skip means an installer
# failed quietly, and the run must not pass as if it had tested everything.
_BAD_SKIPS: list[str] = []


def pytest_configure(config):  # type: ignore[no-untyped-def]
    config.addinivalue_line("markers", "machine_kind(why): may skip on this machine kind")


def pytest_runtest_logreport(report):  # type: ignore[no-untyped-def]
    if report.skipped and not hasattr(report, "wasxfail"):
        if "machine_kind" not in report.keywords:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
            _BAD_SKIPS.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):  # type: ignore[no-untyped-def]
    if _BAD_SKIPS and os.environ.get("TEAMMESH_FAIL_ON_SKIP") == "1" and exitstatus == 0:
        session.exitstatus = 1
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.section("skipped tests fail this run (TEAMMESH_FAIL_ON_SKIP=1)")
            for line in _BAD_SKIPS:
                tr.write_line(line)
