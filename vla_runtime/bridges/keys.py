"""CurveZMQ keys for a bridge that leaves the machine.

Layout written by `generate_keys(out_dir)` (z85 text, one key per file, mode 0600):

    server.public  server.secret        the agent's key pair (the client needs server.public)
    client.public  client.secret        one controller's key pair
    authorized_clients/client.public    public keys the agent accepts (add one file per controller)

The agent loads server.* and authorized_clients/; a client loads client.* and server.public. Copy only
what each side needs: the client machine never needs server.secret and vice versa.
"""

from __future__ import annotations

import os
from pathlib import Path

import zmq

from vla_runtime.errors import UserError


def _write_key(path: Path, key: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.decode("ascii") + "\n")
    os.chmod(path, 0o600)  # also when the file existed with wider permissions


def generate_keys(out_dir: str | Path, overwrite: bool = False) -> dict[str, str]:
    """Write a server and a client CURVE key pair under `out_dir`; returns name -> path.

    Refuses to overwrite existing keys unless `overwrite` (a silently replaced key locks out every client).
    """
    if not zmq.has("curve"):
        raise UserError("this libzmq was built without CURVE support; install pyzmq wheels (they bundle libsodium)")
    out = Path(out_dir)
    if not overwrite and (out / "server.secret").exists():
        raise UserError(f"{out} already holds keys (server.secret); choose another --out or delete them first")
    (out / "authorized_clients").mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    paths: dict[str, str] = {}
    for who in ("server", "client"):
        public, secret = zmq.curve_keypair()
        _write_key(out / f"{who}.public", public)
        _write_key(out / f"{who}.secret", secret)
        paths[f"{who}.public"] = str(out / f"{who}.public")
        paths[f"{who}.secret"] = str(out / f"{who}.secret")
        if who == "client":
            _write_key(out / "authorized_clients" / "client.public", public)
            paths["authorized_clients/client.public"] = str(out / "authorized_clients" / "client.public")
    return paths


def read_key(path: Path) -> bytes:
    """A z85 key file (40 characters). Raises UserError with the path when missing or malformed."""
    if not path.is_file():
        raise UserError(f"CURVE key file {path} not found (create keys with `vla-runtime keys --out DIR`)")
    key = path.read_text().strip().encode("ascii", errors="replace")
    if len(key) != 40:
        raise UserError(f"{path} is not a z85 CURVE key (expected 40 characters, got {len(key)})")
    return key


def load_server_keys(keys_dir: str | Path) -> tuple[bytes, bytes, Path]:
    """(server public, server secret, authorized clients dir) for the agent."""
    d = Path(keys_dir)
    allowed = d / "authorized_clients"
    if not allowed.is_dir():
        raise UserError(f"{allowed} not found: the agent accepts only client keys listed there")
    return read_key(d / "server.public"), read_key(d / "server.secret"), allowed


def load_client_keys(keys_dir: str | Path) -> tuple[bytes, bytes, bytes]:
    """(client public, client secret, server public) for a controller."""
    d = Path(keys_dir)
    return read_key(d / "client.public"), read_key(d / "client.secret"), read_key(d / "server.public")
