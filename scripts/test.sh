#!/usr/bin/env bash
# Install the app with its pinned dependencies into .venv (if needed), lint (ruff), type-check
# (mypy, configured in pyproject.toml) and run the test suite; a lint or type error stops it
# before any test runs. Extra arguments go to pytest, e.g. ./scripts/test.sh -k config
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
.venv/bin/python -m ruff check --quiet . || {
    echo "test.sh: ruff found lint errors (listed above); fix them (many: ruff check --fix .) before the tests run" >&2
    exit 1
}
.venv/bin/python -m mypy || {
    echo "test.sh: mypy found type errors (listed above); fix them before the tests run" >&2
    exit 1
}
# Two pytest-xdist workers, one test file each at a time (--dist loadfile keeps a file's module
# fixtures, e.g. one TLS deployment or compose stack, in one process). The real-runtime tests spend
# much of their time waiting (Flower's 3 s idle polling, its 60 s heartbeat timeout, Docker), so
# two of them overlap well on 2 cores; tests/conftest.py starts those files first, longest first, and
# --no-loadscope-reorder keeps that order (by default pytest-xdist hands out files with the most tests
# first, which started the few-test e2e files last). A serial run: ./scripts/test.sh -n 0
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder "$@"
