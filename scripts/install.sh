#!/usr/bin/env bash
# Installs everything vla-runtime needs on a fresh Debian machine (Python 3.11): the GL libraries for
# offscreen MuJoCo rendering (EGL/Mesa, OSMesa fallback), ffmpeg for videos, then the package itself.
# torch is installed first and alone so that pip takes the pinned CPU wheel and never a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" != 0 ] && SUDO="sudo"
if command -v apt-get >/dev/null; then
  if ! dpkg -s libegl1 libgl1 libegl-mesa0 libosmesa6 ffmpeg >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libegl1 libgl1 libegl-mesa0 libgles2 libosmesa6 ffmpeg >/dev/null
  fi
fi
PY=${PYTHON:-python3}
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e '.[dev,ray]'
echo "vla-runtime installed: $($PY -c 'import vla_runtime; print(vla_runtime.__version__)')"
