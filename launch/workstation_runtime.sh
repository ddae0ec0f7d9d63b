#!/usr/bin/env bash
# On the CUDA workstation: the policy runs on the GPU, the robot agent on the robot PC.
# Real time on the wall clock, async inference with future-state conditioning (after VLASH).
set -euo pipefail
ROBOT=${ROBOT:-tcp://192.168.1.20:5555}   # the robot PC's agent
POLICY=${POLICY:-vla:vla_libero_object}   # or a local checkpoint dir: vla:/path/to/ckpt (HF decoders load too)
KEYS=${KEYS:-$HOME/.vla-runtime/keys}     # client.public + client.secret + server.public
ACCEL=${ACCEL:-specprune}
vla-runtime eval --env "remote:$ROBOT" --keys "$KEYS" --policy "$POLICY" --device cuda --accel "$ACCEL" \
  --clock wall --mode async --episodes "${EPISODES:-10}" --out "${OUT:-runs/robot}"
