"""One exit-code contract for every launcher: 0 only when every planned round ran.

The ServerApp ends its log with ``fl-dp stop-kind: <kind>`` and writes the same ``stop_kind`` to
``summary.json``; a launcher maps it, with the run's Flower status, to its exit code:

====  ==========================================================================
code  meaning
====  ==========================================================================
0     completed: every planned round ran
1     failed: the run failed or was stopped, diverged, or a round had no usable update
2     usage: a bad option or run-config value (nothing was started)
3     budget: stopped by the privacy budget (max-epsilon) before the planned rounds
4     clients: stopped waiting for clients (wait-timeout)
5     timeout: the launcher's own --timeout passed; the run was stopped
====  ==========================================================================
"""

from __future__ import annotations

import json
from pathlib import Path

COMPLETED, FAILED, USAGE, BUDGET, CLIENTS, TIMEOUT = 0, 1, 2, 3, 4, 5
EXIT_CODES = {"completed": COMPLETED, "failed": FAILED, "budget": BUDGET, "clients": CLIENTS}
STOP_KIND_LINE = "fl-dp stop-kind: "
FINISHED = "finished:completed"


def stop_kind_in_log(text: str) -> str | None:
    """The last ``fl-dp stop-kind:`` the ServerApp printed, if any."""
    kinds = [line.split(STOP_KIND_LINE, 1)[1].strip() for line in text.splitlines() if STOP_KIND_LINE in line]
    return kinds[-1] if kinds else None


def stop_kind_in_summary(output_dir: Path) -> str | None:
    try:
        return json.loads((output_dir / "summary.json").read_text()).get("stop_kind")
    except (OSError, ValueError):
        return None


def exit_code(flower_status: str, stop_kind: str | None) -> int:
    """A Flower status that is not finished:completed is a failure whatever the app said."""
    if flower_status != FINISHED:
        return FAILED
    return EXIT_CODES.get(stop_kind or "", FAILED)


def describe(code: int) -> str:
    return {
        COMPLETED: "completed",
        FAILED: "failed",
        BUDGET: "stopped by the privacy budget (max-epsilon)",
        CLIENTS: "stopped waiting for clients (wait-timeout)",
        TIMEOUT: "timed out",
    }.get(code, "usage error")
