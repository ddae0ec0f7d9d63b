#!/usr/bin/env bash
# Generates CurveZMQ key pairs. Copy server.* to the robot PC and client.* + server.public to the workstation;
# the robot agent accepts only client public keys it has been given.
set -euo pipefail
OUT=${OUT:-$HOME/.vla-runtime/keys}
vla-runtime keys --out "$OUT"
