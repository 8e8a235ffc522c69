#!/usr/bin/env bash
# The main job: set up the environment, then `python -m vtprune demo` with any arguments given here.
source "$(dirname "$0")/env.sh"
exec python -m vtprune demo "$@"
