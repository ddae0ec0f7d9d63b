"""CurveZMQ: key files, unknown keys refused, known keys work, no plain-text bind off the machine."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

from vla_runtime.bridges.agent import RobotAgent, is_local_endpoint, run_robot_agent
from vla_runtime.bridges.client import BridgeClient, BridgeError
from vla_runtime.bridges.keys import generate_keys
from vla_runtime.bridges.testing import FakeDriver, free_tcp_endpoint
from vla_runtime.errors import UserError


def test_generate_keys_writes_private_z85_files(tmp_path: Path) -> None:
    paths = generate_keys(tmp_path / "keys")
    assert set(paths) == {"server.public", "server.secret", "client.public", "client.secret",
                          "authorized_clients/client.public"}
    for p in paths.values():
        mode = stat.S_IMODE(Path(p).stat().st_mode)
        assert mode == 0o600, (p, oct(mode))
        assert len(Path(p).read_text().strip()) == 40
    assert Path(paths["client.public"]).read_text() == Path(paths["authorized_clients/client.public"]).read_text()
    assert Path(paths["server.public"]).read_text() != Path(paths["client.public"]).read_text()
    with pytest.raises(UserError, match="already holds keys"):
        generate_keys(tmp_path / "keys")


def test_non_loopback_bind_without_keys_is_refused() -> None:
    assert is_local_endpoint("tcp://127.0.0.1:5555") and is_local_endpoint("ipc:///tmp/x")
    assert not is_local_endpoint("tcp://0.0.0.0:5555") and not is_local_endpoint("tcp://*:5555")
    with pytest.raises(UserError, match="without CurveZMQ keys"):
        RobotAgent(FakeDriver(), "tcp://0.0.0.0:5555")
    with pytest.raises(UserError, match="without CurveZMQ keys"):
        run_robot_agent("dummy:reach", bind="tcp://192.168.1.7:5555", quiet=True)


def _client_dir(tmp: Path, client_keys: Path, server_keys: Path) -> Path:
    d = tmp / f"client-{client_keys.name}"
    d.mkdir()
    for f in ("client.public", "client.secret"):
        shutil.copy(client_keys / f, d / f)
    shutil.copy(server_keys / "server.public", d / "server.public")
    return d


def test_known_key_connects_unknown_key_and_plain_text_are_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    other = tmp_path / "other"
    generate_keys(keys)
    generate_keys(other)
    agent = RobotAgent(FakeDriver(), free_tcp_endpoint(), keys_dir=keys, lockstep=True).start()
    try:
        good = BridgeClient(agent.endpoint, keys_dir=_client_dir(tmp_path, keys, keys), timeout_s=5.0)
        good.connect()
        m = good.request("reset", {"episode": {"task": "hover", "seed": 0}}, expect=("obs",))
        assert m.body["tick"] == 0
        good.close()

        stranger_dir = _client_dir(tmp_path, other, keys)
        stranger = BridgeClient(agent.endpoint, keys_dir=stranger_dir, timeout_s=1.0, handshake_timeout_s=2.0)
        with pytest.raises(BridgeError) as e:
            stranger.connect()
        assert e.value.code == "auth" and "authorized_clients" in str(e.value)  # fails fast, says why
        stranger.close(bye=False)
        assert agent.summary()["curve_refused"] >= 1

        plain = BridgeClient(agent.endpoint, timeout_s=1.0, handshake_timeout_s=1.0)
        with pytest.raises(BridgeError):
            plain.connect()
        plain.close(bye=False)
        # only the authorised client's hellos (handshake + clock probes) ever reached the agent
        assert agent.stats["rx"]["hello"] == good.stats["tx"]["hello"] >= 1

        # authorising a key is adding its file: no restart needed
        shutil.copy(other / "client.public", keys / "authorized_clients" / "other.public")
        late = BridgeClient(agent.endpoint, keys_dir=stranger_dir, timeout_s=5.0, handshake_timeout_s=5.0)
        late.connect()
        late.close()
    finally:
        agent.stop()


def test_remote_env_takes_keys_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vla_runtime.bridges.client import KEYS_ENV, RemoteEnv

    keys = tmp_path / "keys"
    generate_keys(keys)
    agent = RobotAgent(FakeDriver(), free_tcp_endpoint(), keys_dir=keys, lockstep=True).start()
    try:
        monkeypatch.setenv(KEYS_ENV, str(keys))  # the generated dir holds client.* and server.public
        env = RemoteEnv(agent.endpoint, timeout_s=5.0, handshake_timeout_s=5.0)
        assert env.tasks()[0].task == "hover"
        env.close()
    finally:
        agent.stop()
    assert agent.stats["rx"]["hello"] == env.client.stats["tx"]["hello"] >= 1


def test_binding_a_busy_port_is_a_clear_user_error() -> None:
    first = RobotAgent(FakeDriver(), free_tcp_endpoint(), lockstep=True).start()
    try:
        with pytest.raises(UserError, match="cannot bind"):
            RobotAgent(FakeDriver(), first.endpoint, lockstep=True).start()
    finally:
        first.stop()
