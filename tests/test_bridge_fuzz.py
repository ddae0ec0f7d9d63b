"""Fuzz both ends with >= 10,000 malformed, truncated, oversized, wrong-dtype, wrong-version and replayed frames.

Invariants: the process stays up, every bad frame gets a clear error reply (agent) or is dropped with a
counted reason (client), and nothing reaches the actuators (the fake driver's log of applied actions).
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter
from typing import Any

import numpy as np
import pytest
import zmq

from vla_runtime.bridges import protocol as P
from vla_runtime.bridges.agent import RobotAgent
from vla_runtime.bridges.client import BridgeClient, BridgeError
from vla_runtime.bridges.safety import SafetyConfig
from vla_runtime.bridges.testing import FakeDriver, FrameMutator, desc, free_tcp_endpoint, header, pack

LIM = P.Limits(max_header_bytes=4096, max_arrays=8, max_ndim=3, max_dim=4096, max_array_bytes=32 * 1024,
               max_message_bytes=64 * 1024, max_str_len=256, max_depth=6, max_horizon=64)
N_AGENT = 10_000
N_CLIENT = 10_000
BATCH = 200


def _agent_extras(tick: int, stamp: float, lockstep: bool) -> dict[str, Any]:
    """Agent-specific invalid messages: valid frames whose content the agent must refuse.

    wrong_tick: lockstep refuses any tick but the current one; realtime refuses chunks whose ticks all
    passed (a future tick is legitimate there, so the realtime fuzz only sends past ones).
    """

    def chunk(seq: int, actions: np.ndarray, body: dict[str, Any] | None = None, name: str = "actions"
              ) -> list[bytes]:
        b = {"start_tick": tick, "obs_stamp": stamp} if body is None else body
        return [pack(header("action_chunk", seq, b, [desc(name, actions)])), actions.tobytes()]

    ok = np.full((2, 7), 0.1, np.float32)

    def non_finite(seq: int, r: random.Random) -> tuple[list[bytes], set[str]]:
        a = ok.copy()
        a[r.randrange(2), r.randrange(7)] = r.choice([math.nan, math.inf, -math.inf])
        return chunk(seq, a), {"non_finite"}

    def bad_dim(seq: int, r: random.Random) -> tuple[list[bytes], set[str]]:
        return chunk(seq, np.zeros((2, r.choice([1, 6, 8])), np.float32)), {"bad_action_dim"}

    def bad_array(seq: int, r: random.Random) -> tuple[list[bytes], set[str]]:
        j = r.randrange(4)
        if j == 0:
            return chunk(seq, ok.astype(np.float64)), {"bad_shape"}
        if j == 1:
            return chunk(seq, ok[None]), {"bad_shape"}
        if j == 2:
            return chunk(seq, np.zeros((0, 7), np.float32)), {"bad_shape"}
        return chunk(seq, ok, name="acts"), {"bad_field"}

    def wrong_tick(seq: int, r: random.Random) -> tuple[list[bytes], set[str]]:
        if not lockstep and r.random() < 0.3:  # realtime: a plan for the far future is refused too
            return chunk(seq, ok, {"start_tick": 10**9 + r.randint(0, 10**6), "obs_stamp": stamp}), {"bad_field"}
        start = tick + r.randint(1, 100) if lockstep else r.randint(0, 2)
        return chunk(seq, ok, {"start_tick": start, "obs_stamp": stamp}), {"stale"}

    def bad_body(seq: int, r: random.Random) -> tuple[list[bytes], set[str]]:
        b = r.choice([{"start_tick": str(tick), "obs_stamp": stamp}, {"obs_stamp": stamp}, {"start_tick": tick},
                      {"start_tick": -1, "obs_stamp": stamp}, {"start_tick": True, "obs_stamp": stamp},
                      {"start_tick": tick, "obs_stamp": math.nan}, {"start_tick": 1.0, "obs_stamp": stamp}])
        return chunk(seq, ok, b), {"bad_field"}

    def bad_hello(seq: int, r: random.Random) -> tuple[list[bytes], set[str]]:
        b = r.choice([({"protocol": P.PROTOCOL_VERSION + 1}, "bad_version"), ({"protocol": 1}, "bad_version"),
                      ({}, "bad_field"), ({"protocol": "2"}, "bad_field"),
                      ({"protocol": P.PROTOCOL_VERSION, "client": 7}, "bad_field")])
        return [pack(header("hello", seq, b[0]))], {b[1]}

    def bad_reset(seq: int, r: random.Random) -> tuple[list[bytes], set[str]]:
        return [pack(header("reset", seq, r.choice([{}, {"episode": [1]}, {"episode": "hover"}])))], {"bad_field"}

    return {"non_finite": non_finite, "bad_dim": bad_dim, "bad_array": bad_array, "wrong_tick": wrong_tick,
            "bad_body": bad_body, "bad_hello": bad_hello, "bad_reset": bad_reset}


def _fuzz_agent(lockstep: bool, n: int, seed: int) -> Counter[str]:
    """Fuzz one agent; asserts inside, returns the count of error replies by code."""
    drv = FakeDriver()
    agent = RobotAgent(drv, free_tcp_endpoint(), lockstep=lockstep, limits=LIM, takeover_s=60.0,
                       safety=SafetyConfig(max_action_age_s=60.0)).start()
    client = BridgeClient(agent.endpoint, limits=LIM, timeout_s=5.0, handshake_timeout_s=10.0)
    try:
        client.connect()
        first = client.request("reset", {"episode": {"task": "hover", "seed": 0}}, expect=("obs",))
        client._stop_heartbeat()  # from here on the test owns the socket
        deadline = time.monotonic() + 10
        while not lockstep and agent._tick < 5 and time.monotonic() < deadline:  # ticks 0-4 are in the past
            time.sleep(0.01)
        tick, stamp = first.body["tick"], first.body["stamp"]
        spent = client._seq
        replayable = [[pack(header(k, s, b, [desc("actions", np.zeros((1, 7), np.float32))] if k == "action_chunk"
                                   else [])), *([np.zeros((1, 7), np.float32).tobytes()] if k == "action_chunk" else [])]
                      for s in range(0, spent + 1)
                      for k, b in (("hello", {"protocol": P.PROTOCOL_VERSION}), ("action_chunk", {"start_tick": tick, "obs_stamp": stamp}),
                                   ("heartbeat", {}))]
        template = ("action_chunk", {"start_tick": tick, "obs_stamp": stamp}, {"actions": np.full((1, 7), 0.1, np.float32)})
        mut = FrameMutator(seed, template, ("spec", "obs", "step", "ack", "error"), LIM, replayable,
                           _agent_extras(tick, stamp, lockstep))
        sock = client._sock
        assert sock is not None
        cats: Counter[str] = Counter()
        codes: Counter[str] = Counter()
        sent = 0
        while sent < n:
            batch = []
            for _ in range(min(BATCH, n - sent)):
                client._seq += 1
                cat, frames, ok_codes = mut(client._seq)
                batch.append((cat, ok_codes))
                sock.send_multipart(frames, copy=True)
            sent += len(batch)
            for cat, ok_codes in batch:  # replies come back in order: one error per bad frame
                while True:  # realtime: skip the observation stream, every other message is a reply
                    assert sock.poll(10_000), f"no reply for a {cat} frame"
                    reply = P.decode(sock.recv_multipart(copy=False), P.DEFAULT_LIMITS, P.AGENT_KINDS)
                    if not (reply.kind == "obs" and "reply_to" not in reply.body):
                        break
                assert reply.kind == "error", (cat, reply.kind, reply.body)
                assert reply.body["code"] in ok_codes, (cat, reply.body)
                assert isinstance(reply.body["reason"], str) and reply.body["reason"]
                cats[cat] += 1
                codes[reply.body["code"]] += 1
        assert agent.alive and agent.error is None
        assert drv.applied == []  # nothing reached the actuators
        assert sum(agent.stats["dropped"].values()) == n  # every bad frame counted by reason
        assert dict(agent.stats["dropped"]) == dict(codes)
        assert len(cats) >= 20, cats  # the mutator covered its categories
        assert {"replay", "bad_version", "bad_dtype", "too_large", "size_mismatch", "bad_header",
                "non_finite"} <= set(codes)
        # the session survives: a valid chunk still executes exactly once
        client._start_heartbeat()
        seq = client.send_chunk(np.full((1, 7), 0.3, np.float32), stamp, tick)
        if lockstep:
            r = client._wait_reply(seq, 5.0, expect=("step",))
            assert r.body["result"]["executed"] == 1
            assert len(drv.applied) == 1 and np.allclose(drv.applied[0][1], 0.3)
        else:
            with pytest.raises(BridgeError) as e:
                client._wait_reply(seq, 5.0, expect=("ack",))
            assert e.value.code == "stale"  # tick 0 passed long ago: never executed
            assert drv.applied == [] and len(drv.holds) > 0
    finally:
        client.close()
        agent.stop()
    return codes


def test_fuzz_agent_lockstep_10k_frames() -> None:
    assert sum(_fuzz_agent(lockstep=True, n=N_AGENT, seed=0).values()) == N_AGENT


def test_fuzz_agent_realtime_10k_frames() -> None:
    assert sum(_fuzz_agent(lockstep=False, n=N_AGENT, seed=1).values()) == N_AGENT


def _client_extras() -> dict[str, Any]:
    img = np.zeros((16, 16, 3), np.uint8)
    state = np.zeros(8, np.float32)

    def obs(seq: int, arrays: dict[str, np.ndarray], body: dict[str, Any] | None = None) -> list[bytes]:
        b = {"tick": 5, "stamp": 1.0, "instruction": "x", "privileged": {}} if body is None else body
        return [pack(header("obs", seq, b, [desc(k, a) for k, a in arrays.items()])), *[a.tobytes() for a in arrays.values()]]

    def bad_obs(seq: int, r: random.Random) -> tuple[list[bytes], set[str]]:
        j = r.randrange(7)
        if j == 0:
            return obs(seq, {"image/agentview": img}), {"bad_shape"}  # no state
        if j == 1:
            return obs(seq, {"image/agentview": img.astype(np.float32), "state": state}), {"bad_shape"}
        if j == 2:
            return obs(seq, {"image/agentview": img[..., :2].copy(), "state": state}), {"bad_shape"}
        if j == 3:
            return obs(seq, {"image/a": img, "state": state, "weights": state}), {"bad_field"}
        if j == 4:
            return obs(seq, {"state": state}, {"tick": "5", "stamp": 1.0, "instruction": "x"}), {"bad_field"}
        if j == 5:
            return obs(seq, {"state": state}, {"tick": 5, "stamp": 1.0, "instruction": "x",
                                                "privileged": {"p": {"$array": "priv/3"}}}), {"bad_field"}
        return [pack(header("ack", seq, {"reply_to": "7"}))], {"bad_field"}

    return {"bad_obs": bad_obs}


def test_fuzz_client_10k_frames() -> None:
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    endpoint = free_tcp_endpoint()
    router.bind(endpoint)
    client = BridgeClient(endpoint, limits=LIM, timeout_s=5.0, handshake_timeout_s=10.0)
    errors: list[BaseException] = []
    t = threading.Thread(target=lambda: _catch(errors, client.connect))
    t.start()
    try:
        assert router.poll(10_000)
        ident, *frames = router.recv_multipart()
        hello = P.decode(frames, LIM, P.CLIENT_KINDS)
        spec = FakeDriver(image_size=16).spec()
        router.send_multipart([ident, *P.encode("spec", 1, {
            "reply_to": hello.seq, "protocol": P.PROTOCOL_VERSION, "mode": "realtime", "robot": spec.to_dict(), "safety": {},
            "agent_mono": time.monotonic()})])
        t.join(10)
        assert not errors and client.connected
        client._stop_heartbeat()
        body, arrays = P.obs_to_wire({"agentview": np.zeros((16, 16, 3), np.uint8)}, np.zeros(8, np.float32), "x",
                                     1.0, 3, {"task": "hover"})
        replayable = [[f if isinstance(f, bytes) else np.asarray(f).tobytes() for f in P.encode("obs", s, body, arrays)]
                      for s in (0, 1)]
        mut = FrameMutator(2, ("obs", body, arrays), ("hello", "reset", "action_chunk"), LIM, replayable,
                           _client_extras())
        seq = 1
        cats: Counter[str] = Counter()
        for start in range(0, N_CLIENT, BATCH):
            batch = []
            for _ in range(min(BATCH, N_CLIENT - start)):
                seq += 1
                cat, frames, ok_codes = mut(seq)
                batch.append((cat, ok_codes))
                router.send_multipart([ident, *frames])
            for cat, ok_codes in batch:  # the client drops each one and counts it under an expected reason
                before = Counter(client.stats["dropped"])
                assert client._pump(10.0), f"client got nothing for a {cat} frame"
                diff = Counter(client.stats["dropped"])
                diff.subtract(before)
                got = {k for k, v in diff.items() if v}
                assert len(got) == 1 and got <= ok_codes, (cat, got, ok_codes)
                cats[cat] += 1
        assert sum(client.stats["dropped"].values()) == N_CLIENT
        assert client._latest_obs is None and not client._replies  # nothing bad was delivered
        assert len(cats) >= 20
        # a valid observation after the storm is delivered intact
        seq += 1
        router.send_multipart([ident, *P.encode("obs", seq, dict(body, tick=77), arrays)])
        m = client.recv_obs(5.0)
        assert m.body["tick"] == 77 and m.arrays["image/agentview"].shape == (16, 16, 3)
    finally:
        client.close(bye=False)
        router.close(linger=0)


def _catch(errors: list[BaseException], fn: Any) -> None:
    try:
        fn()
    except BaseException as e:  # surfaced by the test's assertion on `errors`
        errors.append(e)
