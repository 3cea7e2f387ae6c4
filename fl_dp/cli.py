"""`fl-dp`: one command for the app's launchers.

    fl-dp simulate   a simulated federation through Flower's runtime (`flwr run`)
    fl-dp sweep      the same federation non-private and at several target epsilons
    fl-dp submit     submit to a running SuperLink and wait for the run
    fl-dp audit      a simulated run with canaries: a measured lower bound on epsilon beside the ledger's
    fl-dp certs      a CA, the SuperLink's certificate and SuperNode keys for TLS
    fl-dp runtime    start|stop|status a warm simulation runtime (SuperLink + Ray) kept between commands

`fl-dp <command> --help` shows each command's options with their defaults. Every launcher
exits 0 only when every planned round ran; see `fl-dp simulate --help` for the other codes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fl_dp import outcome

CERTS_SCRIPT = Path(__file__).resolve().parent / "make_certs.sh"


def _simulate(argv: list[str]) -> int:
    from fl_dp.simulate import main

    return main(argv)


def _sweep(argv: list[str]) -> int:
    from fl_dp.sweep import main

    return main(argv)


def _submit(argv: list[str]) -> int:
    from fl_dp.submit import main

    return main(argv)


def _certs(argv: list[str]) -> int:
    """make_certs.sh needs only bash, openssl and ssh-keygen; its --help lists the options."""
    return subprocess.call(["bash", str(CERTS_SCRIPT), *argv])


def _audit(argv: list[str]) -> int:
    """A simulated run with canaries: a measured lower bound on epsilon next to the ledger's (audit.json)."""
    from fl_dp.audit import main

    return main(argv)


def _runtime(argv: list[str]) -> int:
    """A warm simulation runtime (SuperLink + Ray head) between commands: opt in, start and stop it yourself."""
    from fl_dp.runtime_cli import main

    return main(argv)


COMMANDS = {"simulate": _simulate, "sweep": _sweep, "submit": _submit, "certs": _certs, "audit": _audit,
            "runtime": _runtime}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return outcome.COMPLETED if argv else outcome.USAGE
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"fl-dp: error: unknown command {command!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return outcome.USAGE
    return COMMANDS[command](rest)
