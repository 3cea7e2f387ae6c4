"""Read what a DP run keeps for its operator only (diagnostics.jsonl, mode 0600)."""

import json
from pathlib import Path


def round_counts(run_dir: Path) -> list[dict]:
    """Each round's exact counts (num_replies, num_failures, ...), in round order."""
    lines = (Path(run_dir) / "diagnostics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if "num_replies" in row]
