#!/usr/bin/env python3
"""Kept for existing commands: the same as `fl-dp sweep` (see fl_dp/sweep.py)."""

import sys

from fl_dp.sweep import main

sys.exit(main())
