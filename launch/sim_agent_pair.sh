#!/usr/bin/env bash
# A simulator standing in for the robot, in its own process, and the runtime talking to it over ZeroMQ
# (loopback, no keys needed). --lockstep makes the pair bit-identical to an in-process eval; drop it to run the
# agent's own real-time loop (the runtime then uses --clock wall).
#
#   ENV=libero:libero_object EPISODES=2 SEED=0 launch/sim_agent_pair.sh
#   ENV=libero:libero_object POLICY=vla:vla_libero_object EPISODES=2 EVAL_ARGS="--threads 1" launch/sim_agent_pair.sh
#
# Compare with the same episodes in process (`vla-runtime eval --env libero:libero_object ...`) using
# `python scripts/compare_evals.py IN_PROCESS_DIR $OUT`.
#
# The eval prints its success table; on exit the remote env prints the bridge's round trip (p50/p99) and the
# part of it that is the bridge's own cost, and writes them as JSON to $OUT/bridge_stats.json.
set -euo pipefail
ENV=${ENV:-libero:libero_object}
POLICY=${POLICY:-scripted}
PORT=${PORT:-5555}
OUT=${OUT:-runs/bridge_eval}
mkdir -p "$OUT"
vla-runtime robot --env "$ENV" --bind "tcp://127.0.0.1:$PORT" --lockstep > "$OUT/agent.log" 2>&1 &
AGENT=$!
trap 'kill $AGENT 2>/dev/null || true' EXIT
# wait for the agent to have built its env and be about to bind (importing a simulator can take a while)
for _ in $(seq 120); do
  grep -q "Ctrl-C to stop" "$OUT/agent.log" 2>/dev/null && break
  kill -0 $AGENT 2>/dev/null || { cat "$OUT/agent.log"; exit 1; }
  sleep 1
done
VLA_RUNTIME_BRIDGE_STATS="$OUT/bridge_stats.json" \
  vla-runtime eval --env "remote:tcp://127.0.0.1:$PORT" --policy "$POLICY" --episodes "${EPISODES:-5}" \
  --seed "${SEED:-0}" --out "$OUT" ${EVAL_ARGS:-}
