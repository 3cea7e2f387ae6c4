#!/usr/bin/env bash
# Kept for existing commands: the same as `fl-dp certs` (see fl_dp/make_certs.sh).
exec bash "$(dirname "$0")/../../fl_dp/make_certs.sh" "$@"
