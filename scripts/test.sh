#!/usr/bin/env bash
# Install the app with its pinned dependencies into .venv (if needed) and run the test suite.
# Extra arguments go to pytest, e.g. ./scripts/test.sh -k config
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
exec .venv/bin/python -m pytest -q "$@"
