#!/usr/bin/env bash
# Runs the arms listed in a file (one "ARM ARGS..." line each), two at a time, under nice.
# Usage: experiments/run_arms.sh experiments/arms_round1.txt
cd "$(dirname "$0")/.." || exit 1
xargs -P 2 -L 1 sh -c 'nice -n 10 .venv/bin/python -m experiments.recipe --arm "$0" "$@" > experiments/logs/$0.log 2>&1' < "$1"
