from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


# --- scenario counts: hostile, chaos and fuzz tests say what they tried and lost ----------
# Each scenario calls ``scenario_report(name, tried=N, lost=M)``; the terminal summary
# prints one line per scenario, so a run shows its counts, not only dots.
import pytest

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
