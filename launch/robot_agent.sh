#!/usr/bin/env bash
# On the robot PC. The agent owns safety: clamps to limits, rate-limits, drops stale/non-finite actions, and
# holds within 2 control periods when no fresh chunk arrives. Binding off loopback requires CURVE keys:
# put server.public + server.secret and the runtime's client.public (in authorized_clients/) in $KEYS.
set -euo pipefail
ENV=${ENV:-libero:libero_object}      # a simulator name, or your driver: python:your_pkg.your_module:YourDriver
BIND=${BIND:-tcp://0.0.0.0:5555}
KEYS=${KEYS:-$HOME/.vla-runtime/keys}
vla-runtime robot --env "$ENV" --bind "$BIND" --keys "$KEYS" --max-action-age-ms 150
