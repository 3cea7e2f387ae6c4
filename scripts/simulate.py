#!/usr/bin/env python3
"""Kept for existing commands: the same as `fl-dp simulate` (see fl_dp/simulate.py)."""

import sys

from fl_dp.simulate import main

sys.exit(main())
