"""The runtime side of the bridge: `BridgeClient` (socket, handshake, heartbeats) and `RemoteEnv` (an Env).

`RemoteEnv` makes a robot agent look like any other env, so `vla-runtime eval --env remote:tcp://HOST:PORT`
works unchanged: reset() sends the episode and returns the first observation, step() sends a one-action
chunk and returns the StepResult. For asynchronous inference, `send_chunk()` ships a whole chunk aligned to
the tick it was computed for and `latest_observation()` reads the agent's observation stream.

Clocks: the agent stamps observations with its own monotonic clock. The handshake estimates the offset
between the two clocks (midpoint of the hello round trip), `Observation.stamp` is converted to this
process's monotonic clock, and chunk stamps are converted back, so the agent measures action age in its own
clock (exactly) while the runtime's latency arithmetic stays in local time.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from vla_runtime.bridges import protocol as P
from vla_runtime.bridges.protocol import Limits, ProtocolError, RobotSpec
from vla_runtime.envs.base import Env, EpisodeSpec, StepResult, TaskInfo
from vla_runtime.runtime.types import ActionChunk, Observation

log = logging.getLogger("vla_runtime.bridges.client")


KEYS_ENV = "VLA_RUNTIME_KEYS"  # CurveZMQ client keys directory for RemoteEnv when none is passed


class BridgeError(Exception):
    """The bridge failed: `code` is a protocol error code from the agent, or timeout / auth / closed."""

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"[{code}] {reason}")


class BridgeTimeout(BridgeError):
    def __init__(self, reason: str) -> None:
        super().__init__("timeout", reason)


_AUTH_EVENTS = 0
for _name in ("EVENT_HANDSHAKE_FAILED_AUTH", "EVENT_HANDSHAKE_FAILED_PROTOCOL", "EVENT_HANDSHAKE_FAILED_NO_DETAIL"):
    _AUTH_EVENTS |= int(getattr(zmq, _name, 0))
_LINK_EVENTS = int(zmq.EVENT_CONNECTED) | int(zmq.EVENT_DISCONNECTED)

# A request whose connection dropped is failed when the agent does not come back within this time: a crashed
# agent (a simulator segfault during a long reset) is reported in seconds, not at the request's timeout.
LINK_LOST_GRACE_S = 5.0


class BridgeClient:
    """One controller connection to a robot agent over a DEALER socket.

    Thread-safety: all socket use is under one lock, so the background heartbeat thread can keep the agent's
    watchdog fed while the caller runs a long inference; receive waits poll in short slices.
    """

    def __init__(self, address: str, *, keys_dir: str | Path | None = None, timeout_s: float = 30.0,
                 handshake_timeout_s: float = 10.0, limits: Limits = P.DEFAULT_LIMITS, name: str = "vla-runtime",
                 heartbeat_s: float | None = None, context: zmq.Context | None = None) -> None:
        self.address = address
        self.keys_dir = Path(keys_dir) if keys_dir is not None else None
        self.timeout_s = timeout_s
        self.handshake_timeout_s = handshake_timeout_s
        self.limits = limits
        self.name = name
        self._heartbeat_override = heartbeat_s
        self.heartbeat_s = heartbeat_s or 0.25
        self._ctx = context or zmq.Context.instance()
        self._lock = threading.RLock()
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._link_down_since: float | None = None  # when the TCP/IPC connection to the agent dropped
        self._hb_paused = 0  # > 0 while a request the agent serves without reading its socket is outstanding
        self._seq = 0
        self._last_rx_seq = -1
        self._last_tx = 0.0
        self._replies: dict[int, P.Message] = {}
        self._rejected: dict[int, tuple[str, str]] = {}  # request seq -> (code, reason) of a reply we dropped
        self._latest_obs: P.Message | None = None
        self.async_errors: list[tuple[str, str]] = []  # errors that answered no particular request
        self.stats: dict[str, Counter[str]] = {"rx": Counter(), "dropped": Counter(), "tx": Counter(),
                                              "link": Counter()}
        self.spec_body: dict[str, Any] = {}
        self.robot: RobotSpec | None = None
        self.clock_offset = 0.0  # local monotonic - agent monotonic (s)
        self.clock_rtt_s = 0.0  # round trip of the probe the offset came from (its error is at most half)
        self._hb_stop = threading.Event()
        self._hb_thread: threading.Thread | None = None
        self.connected = False

    # ------------------------------------------------------------------------------------- socket
    def _open(self) -> None:
        self._close_socket()
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.ROUTING_ID, b"c" + os.urandom(15))  # stable per connection: survives TCP reconnects
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)  # per frame: bigger ones cut the connection
        sock.rcvhwm = 128
        sock.sndhwm = 128
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if self.keys_dir is not None:
            from vla_runtime.bridges.keys import load_client_keys

            public, secret, server_public = load_client_keys(self.keys_dir)
            sock.curve_publickey = public
            sock.curve_secretkey = secret
            sock.curve_serverkey = server_public
        if not self.address.startswith("inproc://"):  # link events (and CURVE refusals) for fail-fast waits
            self._monitor = sock.get_monitor_socket(_LINK_EVENTS | (_AUTH_EVENTS if self.keys_dir else 0))
        self._link_down_since = None
        sock.connect(self.address)
        self._sock = sock
        self._seq = 0
        self._last_rx_seq = -1
        self._replies.clear()
        self._rejected.clear()
        self._latest_obs = None

    def _close_socket(self) -> None:
        if self._sock is not None:
            if self._monitor is not None:
                self._sock.disable_monitor()
                self._monitor.close(linger=0)
                self._monitor = None
            self._sock.close(linger=0)
            self._sock = None

    # ------------------------------------------------------------------------------------- handshake
    def connect(self) -> dict[str, Any]:
        """Handshake (hello -> spec), retrying with fresh sockets until `handshake_timeout_s`. Returns the spec body.

        Retries cover an agent that is still starting, a previous controller whose session has not yet
        timed out (`busy`), and a restarted agent. An unknown CURVE key fails fast with code 'auth'.
        """
        deadline = time.monotonic() + self.handshake_timeout_s
        last = "no reply"
        attempt = 0
        with self._lock:
            while True:
                if attempt == 0 or last.startswith("no reply"):
                    self._open()
                attempt += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.connected = False
                    hint = (" (with CURVE: is this client's public key in the agent's authorized_clients?)"
                            if self.keys_dir else f" (if the agent uses CurveZMQ keys, set {KEYS_ENV}=DIR)")
                    raise BridgeTimeout(f"handshake with {self.address} failed after {self.handshake_timeout_s:.1f} s: "
                                        f"{last}{hint}")
                t0 = time.monotonic()
                try:
                    seq = self._send("hello", {"protocol": P.PROTOCOL_VERSION, "client": self.name})
                except BridgeError as e:  # no link yet: still connecting, or a CURVE refusal the monitor reports
                    if e.code != "closed" or self._sock is None:
                        raise
                    self._read_link_events()  # raises 'auth' once the refusal event is in
                    last = "not connected yet"
                    time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))
                    continue
                try:
                    reply = self._wait_reply(seq, min(1.0, remaining), expect=("spec",))
                except BridgeTimeout:
                    last = "no reply from the agent"
                    continue
                except BridgeError as e:
                    if e.code == "busy":
                        last = f"agent busy: {e.reason}"
                        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
                        continue
                    raise
                t1 = time.monotonic()
                break
        body = reply.body
        try:
            proto = P.req_field(body, "protocol", int, "spec")
            if proto != P.PROTOCOL_VERSION:
                raise ProtocolError("bad_version", f"agent speaks protocol {proto}, client {P.PROTOCOL_VERSION}")
            self.robot = RobotSpec.from_dict(body.get("robot"))
            mode = P.req_field(body, "mode", str, "spec")
            if mode not in ("lockstep", "realtime"):
                raise ProtocolError("bad_field", f"spec: unknown mode {mode!r}")
            agent_mono = float(P.req_field(body, "agent_mono", (int, float), "spec"))
        except ProtocolError as e:
            raise BridgeError(e.code, f"bad spec from the agent: {e.reason}") from e
        # Clock offset from the round trip with the smallest RTT (NTP-style): the reply that ended the handshake
        # may answer a hello that waited in the queue while the agent started, so it alone can be far off.
        best = (t1 - t0, (t0 + t1) / 2 - agent_mono)
        with self._lock:
            for _ in range(3):
                a = time.monotonic()
                seq = self._send("hello", {"protocol": P.PROTOCOL_VERSION, "client": self.name})
                try:
                    r = self._wait_reply(seq, 1.0, expect=("spec",))
                except BridgeError as e:
                    log.info("clock probe failed: %s", e)
                    break
                b = time.monotonic()
                m = r.body.get("agent_mono")
                if isinstance(m, (int, float)) and not isinstance(m, bool) and b - a < best[0]:
                    best = (b - a, (a + b) / 2 - float(m))
        self.clock_rtt_s, self.clock_offset = best
        self.spec_body = body
        if self._heartbeat_override is None:  # realtime: 4 heartbeats per watchdog window; lockstep: no watchdog
            wd = body.get("safety", {}).get("watchdog_periods", 2.0) if isinstance(body.get("safety"), dict) else 2.0
            wd_s = float(wd) / self.robot.control_hz if isinstance(wd, (int, float)) else 0.1
            self.heartbeat_s = 0.25 if mode == "lockstep" else min(0.25, max(0.005, wd_s / 4))
        self.connected = True
        self._start_heartbeat()
        return body

    def reconnect(self) -> dict[str, Any]:
        """Drop the socket and handshake again (after the agent restarted or the session was lost)."""
        self._stop_heartbeat()
        with self._lock:
            self._close_socket()
        return self.connect()

    def close(self, bye: bool = True, timeout_s: float = 1.0) -> dict[str, Any] | None:
        """Say bye (the agent holds and frees the session) and close. Returns the agent's summary if it replied."""
        self._stop_heartbeat()
        summary = None
        with self._lock:
            if self._sock is not None and bye and self.connected:
                try:
                    seq = self._send("bye", {"reason": "client closed"})
                    summary = self._wait_reply(seq, timeout_s, expect=("bye",)).body.get("summary")
                except BridgeError as e:
                    log.info("no bye reply from the agent: %s", e)
            self._close_socket()
            self.connected = False
        return summary

    # ------------------------------------------------------------------------------------- heartbeats
    def _start_heartbeat(self) -> None:
        self._stop_heartbeat()
        self._hb_stop.clear()
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name="bridge-heartbeat", daemon=True)
        self._hb_thread.start()

    def _stop_heartbeat(self) -> None:
        self._hb_stop.set()
        if self._hb_thread is not None and self._hb_thread is not threading.current_thread():
            self._hb_thread.join(2.0)
        self._hb_thread = None

    def _heartbeat_loop(self) -> None:
        while not self._hb_stop.wait(self.heartbeat_s / 2):
            with self._lock:
                if self._sock is None:
                    return
                self._maybe_heartbeat()

    def _maybe_heartbeat(self) -> None:
        """Send a heartbeat if nothing was sent for `heartbeat_s` (caller holds the lock)."""
        if self.connected and not self._hb_paused and time.monotonic() - self._last_tx >= self.heartbeat_s:
            try:
                self._send("heartbeat", {})
            except BridgeError as e:  # e.g. send queue full while the agent is away: retried next time
                self.stats["dropped"]["heartbeat_not_sent"] += 1
                (log.warning if self.stats["dropped"]["heartbeat_not_sent"] == 1 else log.debug)(
                    "heartbeat not sent: %s", e)  # every few ms while the agent is away: warn once

    # ------------------------------------------------------------------------------------- send / receive
    def _send(self, kind: str, body: dict[str, Any] | None = None, arrays: dict[str, np.ndarray] | None = None) -> int:
        with self._lock:
            if self._sock is None:
                raise BridgeError("closed", "the bridge client is closed (call connect())")
            self._seq += 1
            frames = P.encode(kind, self._seq, body, arrays)
            try:
                self._sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.Again as e:
                raise BridgeError("closed", f"cannot send to {self.address}: not connected or send queue full") from e
            self._last_tx = time.monotonic()
            self.stats["tx"][kind] += 1
            return self._seq

    def send(self, kind: str, body: dict[str, Any] | None = None, arrays: dict[str, np.ndarray] | None = None) -> int:
        """Send one message; returns its sequence number (replies carry it as 'reply_to')."""
        return self._send(kind, body, arrays)

    def _pump(self, timeout_s: float) -> bool:
        """Receive at most one message within `timeout_s` and route it. Returns False on timeout."""
        with self._lock:
            if self._sock is None:
                raise BridgeError("closed", "the bridge client is closed")
            self._read_link_events()
            self._maybe_heartbeat()
            if not self._sock.poll(int(max(0.0, timeout_s) * 1e3), zmq.POLLIN):
                return False
            frames = self._sock.recv_multipart(copy=False)
        self._route(frames)
        return True

    def _read_link_events(self) -> None:
        """Drain the socket monitor: CURVE refusals raise 'auth'; drops and reconnects update the link state."""
        if self._monitor is None:
            return
        from zmq.utils.monitor import recv_monitor_message

        while self._monitor.poll(0):
            ev = int(recv_monitor_message(self._monitor)["event"])
            if self.keys_dir is not None and ev & _AUTH_EVENTS:
                raise BridgeError("auth", f"CURVE handshake with {self.address} refused: this client's public "
                                          "key is not in the agent's authorized_clients, or server.public is wrong")
            if ev == zmq.EVENT_DISCONNECTED:
                self.stats["link"]["disconnected"] += 1
                if self._link_down_since is None:
                    self._link_down_since = time.monotonic()
            elif ev == zmq.EVENT_CONNECTED:
                self._link_down_since = None

    def _route(self, frames: list[Any]) -> None:
        try:
            msg = P.decode(frames, self.limits, P.AGENT_KINDS)
            if msg.seq <= self._last_rx_seq:
                raise ProtocolError("replay", f"agent seq {msg.seq} <= last {self._last_rx_seq}")
            reply_to = msg.body.get("reply_to")
            if reply_to is not None and (not isinstance(reply_to, int) or isinstance(reply_to, bool)):
                raise ProtocolError("bad_field", "reply_to must be an int")
            if msg.kind == "obs" and reply_to is None:
                P.obs_from_wire(msg.body, msg.arrays)  # validate before it can become the latest observation
        except ProtocolError as e:
            self.stats["dropped"][e.code] += 1
            # A correct agent never sends an invalid message: say so once per reason (a flood stays quiet)
            (log.warning if self.stats["dropped"][e.code] == 1 else log.debug)(
                "dropped a message from the agent: %s", e)
            reply_to = P.peek_reply_to(frames, self.limits)
            if reply_to is not None:  # it answered a request: fail that request now, not at its timeout
                self._rejected[reply_to] = (e.code, e.reason)
                while len(self._rejected) > 64:
                    del self._rejected[next(iter(self._rejected))]
            return
        self._last_rx_seq = msg.seq
        self.stats["rx"][msg.kind] += 1
        if reply_to is not None:
            self._replies[reply_to] = msg
            if msg.kind == "obs":  # a reset's first observation: streamed ones before it are the old episode's
                self._latest_obs = None
            if len(self._replies) > 256:  # replies nobody waits for (acks of async chunks): keep the newest
                for k in sorted(self._replies)[:-128]:
                    del self._replies[k]
        elif msg.kind == "obs":
            self._latest_obs = msg  # agent seqs only increase (replays are dropped): the newest wins
        elif msg.kind == "error":
            code, reason = str(msg.body.get("code", "?")), str(msg.body.get("reason", ""))
            self.async_errors.append((code, reason))
            del self.async_errors[:-100]
            log.warning("agent error: [%s] %s", code, reason)

    def _wait_reply(self, seq: int, timeout_s: float, expect: tuple[str, ...]) -> P.Message:
        deadline = time.monotonic() + timeout_s
        while True:
            msg = self._replies.pop(seq, None)
            if msg is not None:
                if msg.kind == "error":
                    raise BridgeError(str(msg.body.get("code", "?")), str(msg.body.get("reason", "")))
                if msg.kind not in expect:
                    self.stats["dropped"]["unexpected_reply"] += 1
                    raise BridgeError("bad_field", f"expected {'/'.join(expect)} in reply, got {msg.kind}")
                return msg
            rejected = self._rejected.pop(seq, None)
            if rejected is not None:
                raise BridgeError(rejected[0], f"the agent's reply was invalid and dropped by this client: "
                                               f"{rejected[1]}")
            down = self._link_down_since
            if down is not None and self.connected and time.monotonic() - down > LINK_LOST_GRACE_S:
                raise BridgeError("closed", f"lost the connection to the agent at {self.address} while waiting for "
                                            f"its reply, and it did not come back within {LINK_LOST_GRACE_S:.0f} s "
                                            "(agent crashed or stopped? see its log)")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BridgeTimeout(f"no reply from {self.address} within {timeout_s:.1f} s")
            self._pump(min(remaining, 0.02))

    def request(self, kind: str, body: dict[str, Any] | None = None, arrays: dict[str, np.ndarray] | None = None,
                expect: tuple[str, ...] = (), timeout_s: float | None = None, heartbeats: bool = True) -> P.Message:
        """Send and wait for the reply (raises BridgeError on an error reply, BridgeTimeout on silence).

        `heartbeats=False` for a request the agent serves without reading its socket (a reset builds a
        simulator or homes an arm for seconds to minutes, and no watchdog runs meanwhile): heartbeats sent
        then would only pile up in the agent's queue, and a realtime client's (every few ms) would fill the
        send queue until sends fail.
        """
        if not heartbeats:
            self._hb_paused += 1
        try:
            seq = self._send(kind, body, arrays)
            return self._wait_reply(seq, self.timeout_s if timeout_s is None else timeout_s, expect)
        finally:
            if not heartbeats:
                self._hb_paused -= 1

    def poll_reply(self, seq: int) -> P.Message | None:
        """The reply to `seq` if it arrived (non-blocking), e.g. the ack of an async chunk."""
        while self._pump(0):
            pass
        return self._replies.pop(seq, None)

    def newest_obs(self) -> P.Message | None:
        """The newest streamed observation received so far (non-blocking; drains the socket first)."""
        while self._pump(0):
            pass
        return self._latest_obs

    def recv_obs(self, timeout_s: float | None = None, after_tick: int = -1) -> P.Message:
        """The newest streamed observation with tick > `after_tick` (realtime mode); waits up to `timeout_s`."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            while self._pump(0):  # drain: the newest wins
                pass
            m = self._latest_obs
            if m is not None and m.body["tick"] > after_tick:
                return m
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BridgeTimeout(f"no observation after tick {after_tick} from {self.address} within "
                                    f"{self.timeout_s if timeout_s is None else timeout_s:.2f} s")
            self._pump(min(remaining, 0.02))

    def send_chunk(self, actions: np.ndarray, obs_stamp_agent: float, start_tick: int) -> int:
        """Ship actions float32 (H, A) for ticks start_tick.. answering the obs stamped `obs_stamp_agent`."""
        a = np.ascontiguousarray(actions, dtype=np.float32)
        if a.ndim == 1:
            a = a[None]
        return self._send("action_chunk", {"start_tick": int(start_tick), "obs_stamp": float(obs_stamp_agent)},
                          {"actions": a})


# ----------------------------------------------------------------------------------------------- RemoteEnv

RESET_TIMEOUT_S = 300.0
STATS_ENV = "VLA_RUNTIME_BRIDGE_STATS"  # RemoteEnv.close() writes bridge_stats() as JSON to this path if set


def _pcts(v: list[float]) -> dict[str, float | None]:
    if not v:
        return {"p50": None, "p99": None, "max": None}
    a = np.asarray(v)
    return {"p50": round(float(np.percentile(a, 50)), 3), "p99": round(float(np.percentile(a, 99)), 3),
            "max": round(float(a.max()), 3)}


class RemoteEnv(Env):
    """An Env whose simulator or robot sits behind a robot agent (`remote:tcp://HOST:PORT`)."""

    def __init__(self, address: str, *, keys_dir: str | None = None, timeout_s: float = 30.0,
                 handshake_timeout_s: float = 10.0, limits: Limits = P.DEFAULT_LIMITS, **_: Any) -> None:
        self.address = address
        if keys_dir is None:  # `vla-runtime eval --env remote:...` passes no keys: take them from the environment
            keys_dir = os.environ.get(KEYS_ENV) or None
        self.client = BridgeClient(address, keys_dir=keys_dir, timeout_s=timeout_s,
                                   handshake_timeout_s=handshake_timeout_s, limits=limits)
        body = self.client.connect()
        robot = self.client.robot
        assert robot is not None
        self.robot = robot
        self.mode: str = body["mode"]
        self.spec = robot.env_spec(f"remote:{address}")
        self._tick = 0
        self._agent_stamp = 0.0
        self.last_safety: dict[str, Any] = {}
        # lockstep timings (ms), for bridge_stats(): step() round trip, and the part the agent reported
        # spending on it (simulator step, safety, encoding); their difference is the bridge's own cost
        self._rtt_ms: list[float] = []
        self._agent_ms: list[float] = []
        self._reset_ms: list[float] = []
        # realtime: the agent paces the episode (step() returns when the robot has moved one tick), so a
        # runtime loop should not pace again on top (use the unpaced clock, or the wall clock knowingly)
        self.paces_itself = self.mode == "realtime"

    def tasks(self) -> list[TaskInfo]:
        return [TaskInfo(t, i, m, n) for t, i, m, n in self.robot.tasks]

    def hold_action(self) -> np.ndarray:
        return np.asarray(self.robot.hold_action, np.float32)

    def _observation(self, msg: P.Message) -> Observation:
        w = P.obs_from_wire(msg.body, msg.arrays, msg.kind, image_size=None, state_dim=self.robot.state_dim)
        self._tick = w.tick
        self._agent_stamp = w.stamp
        return Observation(images=w.images, state=w.state, instruction=w.instruction,
                           stamp=w.stamp + self.client.clock_offset, step=w.tick, privileged=w.privileged)

    def _decode(self, msg: P.Message) -> Observation:
        try:
            return self._observation(msg)
        except ProtocolError as e:
            raise BridgeError(e.code, f"bad observation from the agent: {e.reason}") from e

    def reset(self, episode: EpisodeSpec) -> Observation:
        # a reset may build a simulator (LIBERO: seconds, minutes on a loaded machine) or home a robot arm
        t0 = time.perf_counter()
        m = self.client.request("reset", {"episode": episode.to_dict(), "resolve_init_state": True}, expect=("obs",),
                                timeout_s=max(self.client.timeout_s, RESET_TIMEOUT_S), heartbeats=False)
        self._reset_ms.append((time.perf_counter() - t0) * 1e3)
        return self._decode(m)

    def step(self, action: np.ndarray) -> StepResult:
        a = np.asarray(action, np.float32).reshape(1, -1)  # (1, A)
        if self.mode == "lockstep":
            t0 = time.perf_counter()
            seq = self.client.send_chunk(a, self._agent_stamp, self._tick)
            m = self.client._wait_reply(seq, self.client.timeout_s, expect=("step",))
            obs = self._decode(m)
            rtt = (time.perf_counter() - t0) * 1e3
            agent_ms = m.body.get("agent_ms")
            if isinstance(agent_ms, (int, float)) and not isinstance(agent_ms, bool) and len(self._rtt_ms) < 1_000_000:
                self._rtt_ms.append(rtt)
                self._agent_ms.append(float(agent_ms))
            r = m.body.get("result", {})
            self.last_safety = m.body.get("safety", {})
            return StepResult(obs, float(r.get("reward", 0.0)), bool(r.get("success", False)), bool(r.get("done", False)),
                              {"safety": self.last_safety, "executed": r.get("executed", 0)})
        # realtime: the agent owns time. The action goes to the agent's current tick (the newest streamed
        # observation's, which may be newer than the one the caller acted on if the caller was slow or slept),
        # and the step returns the first observation captured after that tick executed.
        tick = self._tick
        newest = self.client.newest_obs()
        if newest is not None:
            tick = max(tick, int(newest.body["tick"]))
        seq = self.client.send_chunk(a, self._agent_stamp, tick)
        m = self.client.recv_obs(after_tick=tick)
        obs = self._decode(m)
        info: dict[str, Any] = {"safety_total": m.body.get("safety_total", {})}
        reply = self.client.poll_reply(seq)
        if reply is not None and reply.kind == "error":
            code = str(reply.body.get("code"))
            if code != "stale":  # late actions are a normal real-time event: the robot held
                raise BridgeError(code, str(reply.body.get("reason", "")))
            info["dropped"] = str(reply.body.get("reason", ""))
        r = m.body.get("result", {}) if isinstance(m.body.get("result"), dict) else {}
        return StepResult(obs, float(r.get("reward", 0.0)), bool(r.get("success", False)), bool(r.get("done", False)),
                          info)

    def send_chunk(self, chunk: ActionChunk, start_tick: int | None = None) -> int:
        """Async use: ship a whole chunk for ticks start_tick.. (default: the tick of the latest observation).

        `chunk.stamp` is the local stamp of the observation it answers; the agent measures the chunk's age
        from it in its own clock. Returns the message seq (see BridgeClient.poll_reply for the ack).
        """
        return self.client.send_chunk(chunk.actions, chunk.stamp - self.client.clock_offset,
                                      self._tick if start_tick is None else start_tick)

    def latest_observation(self, timeout_s: float | None = None, after_tick: int = -1) -> Observation:
        """The newest streamed observation (realtime mode) with tick > after_tick."""
        return self._decode(self.client.recv_obs(timeout_s, after_tick))

    def bridge_stats(self) -> dict[str, Any]:
        """Lockstep step() timings (ms): round trip (send -> decoded reply), the agent's share, and the bridge's
        own cost (round trip minus the agent's share: encoding, two hops, decoding), plus reset times."""
        rtt, agent = np.asarray(self._rtt_ms), np.asarray(self._agent_ms)
        return {"address": self.address, "mode": self.mode, "steps": int(rtt.size), "resets": len(self._reset_ms),
                "round_trip_ms": _pcts(self._rtt_ms), "agent_ms": _pcts(self._agent_ms),
                "bridge_ms": _pcts((rtt - agent).tolist()), "reset_ms": _pcts(self._reset_ms),
                "dropped": dict(self.client.stats["dropped"]), "link": dict(self.client.stats["link"])}

    def close(self) -> None:
        """Close the connection; report bridge_stats() on stderr (and to $VLA_RUNTIME_BRIDGE_STATS if set)."""
        self.client.close()
        if self._rtt_ms or self._reset_ms:
            import json
            import sys

            st = self.bridge_stats()
            print(f"bridge {self.address}: {st['steps']} steps, round trip p50 {st['round_trip_ms']['p50']} ms "
                  f"p99 {st['round_trip_ms']['p99']} ms, of which bridge p50 {st['bridge_ms']['p50']} ms "
                  f"p99 {st['bridge_ms']['p99']} ms; {st['resets']} resets, max {st['reset_ms']['max']} ms",
                  file=sys.stderr)
            path = os.environ.get(STATS_ENV)
            if path:
                Path(path).write_text(json.dumps(st, indent=1))
