#!/usr/bin/env bash
# A simulator standing in for the robot, in its own process, and the runtime talking to it over ZeroMQ
# (loopback, no keys needed). --lockstep makes the pair bit-identical to an in-process eval; drop it to run the
# agent's own real-time loop (the runtime then uses --clock wall).
set -euo pipefail
ENV=${ENV:-libero:libero_object}
POLICY=${POLICY:-scripted}
PORT=${PORT:-5555}
vla-runtime robot --env "$ENV" --bind "tcp://127.0.0.1:$PORT" --lockstep &
AGENT=$!
trap 'kill $AGENT 2>/dev/null || true' EXIT
sleep 5
vla-runtime eval --env "remote:tcp://127.0.0.1:$PORT" --policy "$POLICY" --episodes "${EPISODES:-5}" \
  --out "${OUT:-runs/bridge_eval}"
