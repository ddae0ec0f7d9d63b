#!/usr/bin/env bash
# Closed-loop evaluation in simulation on this machine.
set -euo pipefail
ENV=${ENV:-libero:libero_object}      # robosuite:Lift|Stack|PickPlaceCan, libero:<suite>[/<task>]
POLICY=${POLICY:-scripted}            # see `vla-runtime list`
EPISODES=${EPISODES:-10}              # per task
SEED=${SEED:-0}                       # LIBERO: init states (SEED+i) mod 50
OUT=${OUT:-runs/sim_eval}
vla-runtime eval --env "$ENV" --policy "$POLICY" --episodes "$EPISODES" --seed "$SEED" \
  --workers 2 --threads 1 --video 1 --out "$OUT" --resume
