"""The `fl-dp` command line: simulate, sweep, submit, certs (see :mod:`fl_dp.cli`)."""
