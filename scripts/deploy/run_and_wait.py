#!/usr/bin/env python3
"""Kept for existing commands and the compose `submit` service: the same as `fl-dp submit`."""

import sys

from fl_dp.submit import main

sys.exit(main())
