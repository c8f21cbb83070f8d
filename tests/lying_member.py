"""A member that returns wrong answers it stands behind: the real daemon, patched.

``python tests/lying_member.py ARGS`` runs ``teammesh ARGS``. As an executor it replaces
every successful output with ``"a lie"`` *before* the output digest is taken, so its
signed results are well-formed and self-consistent: only a comparison with another
member's answer (``replicas``) can tell. Compare tests/hostile_member.py's ``forge``,
which alters outputs after signing and is caught by the digest check alone.
"""

from __future__ import annotations

import sys
from typing import Any

from teammesh.node.cli.main import main
from teammesh.node.tasks import executor
from teammesh.protocols.tasks import TaskResult, make_result

LIE = "a lie"


def lying_result(task_id: str, ok: bool, output: Any, error: str | None, wall_ms: float,
                 cpu_ms: float) -> TaskResult:
    return make_result(task_id, ok, LIE if ok else output, error, wall_ms, cpu_ms)


if __name__ == "__main__":
    executor.make_result = lying_result  # type: ignore[assignment]
    sys.argv[0] = "teammesh"
    main()
