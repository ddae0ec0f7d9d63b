"""The robot agent: the thin process next to the robot (or a simulator standing in for it).

It owns time and safety. In `realtime` mode it runs its own fixed-rate loop at the robot's control rate:
each tick it publishes an observation, and at the end of the period executes the action queued for that
tick (or holds). Actions arrive as timestamped chunks keyed by tick, so a chunk computed from an old
observation lands on the ticks it was meant for and nothing stale ever executes (see safety.py). In
`lockstep` mode (simulation only) the simulator advances one tick per received action, so an evaluation over
the bridge is bit-identical to an in-process one.

Only numpy, pyzmq and msgpack are needed here: the robot side never imports model code.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import zmq

from vla_runtime.bridges import protocol as P
from vla_runtime.bridges.protocol import Limits, ProtocolError, RobotSpec
from vla_runtime.bridges.safety import SafetyConfig, SafetyFilter
from vla_runtime.runtime.types import Observation

log = logging.getLogger("vla_runtime.bridges.agent")


# ----------------------------------------------------------------------------------------------- drivers

@dataclass
class Outcome:
    """What the robot reports after an action: simulators fill success/done, real robots leave them False."""

    reward: float = 0.0
    success: bool = False
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class RobotDriver(Protocol):
    """The robot, as the agent sees it. Implement this for a real robot; `SimDriver` wraps a simulator.

    All methods are called from the agent's single thread, never concurrently.
    """

    def spec(self) -> RobotSpec:
        """Action dim and limits, cameras, image size, state dim, control rate, hold action, tasks."""

    def reset(self, episode: dict[str, Any]) -> Observation:
        """Start an episode (an EpisodeSpec dict for simulators; robots may move to a home pose)."""

    def read_observation(self) -> Observation:
        """The latest observation (images uint8 (H, W, 3), state float32 (S,))."""

    def apply_action(self, action: np.ndarray) -> None:
        """Send one safe, clamped action (float32 (A,)) to the actuators."""

    def hold(self) -> None:
        """Keep the robot where it is for one tick (zero delta, gripper holds)."""

    def outcome(self) -> Outcome:
        """Reward / success / done after the last action or hold."""

    def close(self) -> None:
        """Release the hardware or simulator."""


class SimDriver:
    """A `RobotDriver` over any vla_runtime `Env` (make_env(name)): the simulator stands in for the robot."""

    def __init__(self, env: Any) -> None:
        self.env = env
        self._obs: Observation | None = None
        self._outcome = Outcome()

    def spec(self) -> RobotSpec:
        s = self.env.spec
        return RobotSpec(name=s.name, action_dim=s.action_dim, action_low=tuple(map(float, s.action_low)),
                         action_high=tuple(map(float, s.action_high)), cameras=tuple(s.cameras),
                         image_size=int(s.image_size), state_dim=int(s.state_dim), control_hz=float(s.control_hz),
                         hold_action=tuple(float(x) for x in self.env.hold_action()),
                         tasks=tuple((t.task, t.instruction, int(t.max_steps), int(t.init_states))
                                     for t in self.env.tasks()))

    def reset(self, episode: dict[str, Any]) -> Observation:
        from vla_runtime.envs.base import EpisodeSpec

        d = dict(episode)
        resolve = bool(d.pop("resolve_init_state", False))
        d.setdefault("env", self.env.spec.name)
        d["env"] = self.env.spec.name  # the robot's own env, whatever name the client used for it
        try:
            ep = EpisodeSpec.from_dict(d)
        except TypeError as e:
            raise ValueError(f"bad episode spec: {e}") from e
        if resolve and ep.init_state is None:
            import dataclasses

            ep = dataclasses.replace(ep, init_state=self.env.init_state_for(ep.task, ep.seed))
        self._obs = self.env.reset(ep)
        self._outcome = Outcome()
        return self._obs

    def read_observation(self) -> Observation:
        if self._obs is None:
            raise RuntimeError("read_observation before reset")
        return self._obs

    def apply_action(self, action: np.ndarray) -> None:
        r = self.env.step(action)
        self._obs = r.obs
        self._outcome = Outcome(float(r.reward), bool(r.success), bool(r.done), dict(r.info))

    def hold(self) -> None:
        self.apply_action(self.env.hold_action())

    def outcome(self) -> Outcome:
        return self._outcome

    def close(self) -> None:
        self.env.close()


# ----------------------------------------------------------------------------------------------- security

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def is_local_endpoint(endpoint: str) -> bool:
    """True for ipc:// / inproc:// and tcp:// on a loopback address."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0]
    return host in LOOPBACK_HOSTS or host.startswith("127.")


class _AllowedKeys:
    """CURVE credentials provider: a client is allowed iff its z85 public key is in `dir/*.public`."""

    def __init__(self, allowed_dir: Path) -> None:
        self.dir = allowed_dir
        self.refused = 0

    def keys(self) -> set[bytes]:
        return {p.read_text().strip().encode() for p in sorted(self.dir.glob("*.public"))}

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key in self.keys()  # re-read on each connection: adding a key file needs no restart
        if not ok:
            self.refused += 1
            log.warning("refused CURVE client with unknown public key %s", key.decode(errors="replace"))
        return ok


# ----------------------------------------------------------------------------------------------- the agent

@dataclass
class CommandRecord:
    """One executed control tick: what went to the actuators, when, and why (for audits and tests)."""

    t: float  # agent monotonic time the command was sent
    tick: int
    kind: str  # "action" | "hold"
    action: np.ndarray  # float32 (A,) actually commanded (hold action for holds)
    reason: str = ""  # hold reason: starved | watchdog | stale_age | no_session
    obs_stamp: float | None = None  # agent-clock stamp of the observation the action answers (None: hold)


@dataclass
class _Session:
    identity: bytes
    last_seq: int
    last_rx: float
    client: str = ""


class RobotAgent:
    """Serves one controller at a time over a ZeroMQ ROUTER socket (see docs/PROTOCOL.md).

    Use `run()` to block in the calling thread, or `start()` / `stop()` to run it in a background thread.
    """

    def __init__(self, driver: RobotDriver, bind: str = "tcp://127.0.0.1:5555", *, lockstep: bool = False,
                 safety: SafetyConfig = SafetyConfig(), keys_dir: str | Path | None = None,
                 limits: Limits = P.DEFAULT_LIMITS, takeover_s: float = 1.0, log_size: int = 100_000,
                 context: zmq.Context | None = None) -> None:
        from vla_runtime.errors import UserError

        if not is_local_endpoint(bind) and keys_dir is None:
            raise UserError(f"refusing to bind {bind} without CurveZMQ keys: pass --keys DIR (create keys with "
                            "`vla-runtime keys --out DIR`) or bind tcp://127.0.0.1:PORT")
        self.driver = driver
        self.bind = bind
        self.lockstep = lockstep
        self.safety_cfg = safety
        self.keys_dir = Path(keys_dir) if keys_dir is not None else None
        self.limits = limits
        self.takeover_s = takeover_s
        self.robot = driver.spec()
        self.period = 1.0 / self.robot.control_hz
        self.watchdog_s = safety.watchdog_periods * self.period
        self.safety = SafetyFilter(np.asarray(self.robot.action_low, np.float32),
                                   np.asarray(self.robot.action_high, np.float32),
                                   np.asarray(self.robot.hold_action, np.float32), safety)
        self.commands: deque[CommandRecord] = deque(maxlen=log_size)
        self.rx_log: deque[tuple[float, str, int]] = deque(maxlen=log_size)  # (t, kind, seq) of accepted messages
        self.stats: dict[str, Counter[str]] = {"rx": Counter(), "dropped": Counter(), "tx": Counter(),
                                              "link": Counter()}
        # a CURVE agent gets its own context: its ZAP handler (one per context) must not clash with another's
        self._own_ctx = context is None and keys_dir is not None
        self._ctx = context or (zmq.Context() if self._own_ctx else zmq.Context.instance())
        self._sock: zmq.Socket | None = None
        self._auth: Any = None
        self._allowed: _AllowedKeys | None = None
        self._seq = 0
        self._session: _Session | None = None
        self._episode_active = False
        self._tick = 0
        self._next_deadline = 0.0
        self._queue: dict[int, tuple[np.ndarray, float]] = {}  # tick -> (action (A,), obs stamp)
        self._last_outcome = Outcome()
        self._episodes = 0
        self._overruns = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()  # set once bound
        self.error: BaseException | None = None  # what ended a background run, if it crashed
        self.endpoint = bind

    # ------------------------------------------------------------------------------------- lifecycle
    def _open(self) -> None:
        if self._own_ctx and self._ctx.closed:  # run() again after a previous run terminated it
            self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting client keeps its identity
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)  # per frame: bigger ones cut the connection
        sock.sndhwm = 1000
        sock.rcvhwm = 1000
        if self.keys_dir is not None:
            from zmq.auth.thread import ThreadAuthenticator

            from vla_runtime.bridges.keys import load_server_keys

            public, secret, allowed_dir = load_server_keys(self.keys_dir)
            self._auth = ThreadAuthenticator(self._ctx)
            self._auth.start()
            self._allowed = _AllowedKeys(allowed_dir)
            self._auth.configure_curve_callback(domain="*", credentials_provider=self._allowed)
            sock.curve_server = True
            sock.curve_publickey = public
            sock.curve_secretkey = secret
        try:
            sock.bind(self.bind)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            from vla_runtime.errors import UserError

            raise UserError(f"cannot bind the robot agent to {self.bind}: {e} (another agent running? pick "
                            "another --bind port)") from e
        self.endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._sock = sock
        self.ready.set()

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._own_ctx:
            self._ctx.term()

    def start(self) -> "RobotAgent":
        """Run in a daemon thread; returns once the socket is bound (raises if binding failed)."""
        self._stop.clear()

        def target() -> None:
            try:
                self.run()
            except BaseException as e:  # kept for the owner to inspect, and logged: never silent
                self.error = e
                log.exception("robot agent crashed")
                self.ready.set()

        self._thread = threading.Thread(target=target, name="robot-agent", daemon=True)
        self._thread.start()
        self.ready.wait(10.0)
        if self.error is not None:
            raise self.error
        return self

    def stop(self, timeout: float = 5.0) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        return self.summary()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run(self, stop: threading.Event | None = None) -> dict[str, Any]:
        """Serve until `stop` (or `self.stop()`) is set. Returns the final summary."""
        stop_ev = stop or self._stop
        self._open()
        assert self._sock is not None
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        try:
            while not stop_ev.is_set() and not self._stop.is_set():
                timeout_ms = 50.0
                if self._realtime_active():
                    timeout_ms = min(timeout_ms, max(0.0, (self._next_deadline - time.monotonic()) * 1e3))
                if poller.poll(timeout_ms):
                    for _ in range(64):  # bounded: a flood cannot starve the control tick
                        try:
                            frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle(frames)
                        if self._realtime_active() and time.monotonic() >= self._next_deadline:
                            break
                if self._realtime_active() and time.monotonic() >= self._next_deadline:
                    self._tick_once()
        finally:
            self._close()
            self._episode_active = False
        return self.summary()

    def summary(self) -> dict[str, Any]:
        timing: dict[str, Any] = {}
        if not self.lockstep and len(self.commands) > 2:  # how evenly the control loop ticked
            t = np.array([c.t for c in list(self.commands)[-10_000:]])
            d = np.diff(t) * 1e3
            d = d[d < 5 * self.period * 1e3]  # gaps between episodes are not jitter
            if d.size:
                timing = {"tick_interval_ms_p50": round(float(np.percentile(d, 50)), 3),
                          "tick_interval_ms_p99": round(float(np.percentile(d, 99)), 3),
                          "tick_interval_ms_max": round(float(d.max()), 3)}
        return {"robot": self.robot.name, "mode": "lockstep" if self.lockstep else "realtime",
                "episodes": self._episodes, "tick": self._tick, "safety": self.safety.summary(),
                "rx": dict(self.stats["rx"]), "dropped": dict(self.stats["dropped"]), "tx": dict(self.stats["tx"]),
                "link": dict(self.stats["link"]),
                "commands": len(self.commands), "overruns": self._overruns,
                "curve_refused": self._allowed.refused if self._allowed else 0, **timing}

    # ------------------------------------------------------------------------------------- sending
    def _send(self, identity: bytes, kind: str, body: dict[str, Any] | None = None,
              arrays: dict[str, np.ndarray] | None = None) -> None:
        assert self._sock is not None
        try:
            # checked against the limits the agent advertised: a reply the client would drop (and so wait
            # for until its timeout) becomes an error it can read instead
            frames = P.encode(kind, self._seq + 1, body, arrays, self.limits)
        except ProtocolError as e:
            if kind == "error":
                raise
            log.error("cannot send %s: %s", kind, e)
            self.stats["dropped"][f"tx_{e.code}"] += 1
            reply_to = (body or {}).get("reply_to")
            self._send_error(identity, ProtocolError(e.code, f"the agent's {kind} cannot be sent: {e.reason}"),
                             reply_to if isinstance(reply_to, int) else None)
            return
        self._seq += 1
        try:
            self._sock.send_multipart([identity, *frames], zmq.NOBLOCK, copy=False)
            self.stats["tx"][kind] += 1
        except zmq.Again:  # the client does not read: never block the control loop for it
            self.stats["dropped"]["tx_hwm"] += 1

    def _send_error(self, identity: bytes, err: ProtocolError, reply_to: int | None) -> None:
        self._send(identity, "error", {"code": err.code, "reason": err.reason[:500], "reply_to": reply_to})

    # ------------------------------------------------------------------------------------- receiving
    def _handle(self, frames: list[Any]) -> None:
        now = time.monotonic()
        if len(frames) < 2:  # ROUTER always prepends the identity; nothing to reply to without a message
            self.stats["dropped"]["frame_count"] += 1
            return
        identity = bytes(frames[0].bytes)
        seq: int | None = None
        try:
            msg = P.decode(frames[1:], self.limits, P.CLIENT_KINDS)
            seq = msg.seq
            self._check_session(identity, msg, now)
            if msg.kind == "hello":
                self._on_hello(identity, msg)
            elif msg.kind == "reset":
                self._on_reset(identity, msg)
            elif msg.kind == "action_chunk":
                self._on_chunk(identity, msg, now)
            elif msg.kind == "bye":
                self._accept(msg, now)
                self._send(identity, "bye", {"reply_to": msg.seq, "summary": P.plain(self.summary())})
                self._session = None
                self._queue.clear()
            else:  # heartbeat: refreshes the watchdog, no reply
                self._accept(msg, now)
        except ProtocolError as e:
            self.stats["dropped"][e.code] += 1
            self._send_error(identity, e, seq)
        except Exception as e:  # an agent bug must answer the request, not kill the loop or leave it unanswered
            log.exception("agent failed to handle a message")
            self.stats["dropped"]["internal"] += 1
            self._episode_active = False
            self._send_error(identity, ProtocolError("internal", f"{type(e).__name__}: {str(e)[:300]}"), seq)

    def _check_session(self, identity: bytes, msg: P.Message, now: float) -> None:
        s = self._session
        if msg.kind == "hello":
            if s is not None and s.identity != identity and now - s.last_rx < self.takeover_s:
                raise ProtocolError("busy", f"controller {s.client!r} holds the session (active "
                                            f"{now - s.last_rx:.2f} s ago); retry after {self.takeover_s} s of silence")
            if s is not None and s.identity == identity and msg.seq <= s.last_seq:
                raise ProtocolError("replay", f"seq {msg.seq} <= last accepted {s.last_seq}")
            return
        if s is None or s.identity != identity:
            raise ProtocolError("no_session", "send hello first (or the session was taken over / closed)")
        if msg.seq <= s.last_seq:
            raise ProtocolError("replay", f"seq {msg.seq} <= last accepted {s.last_seq}")

    def _accept(self, msg: P.Message, now: float) -> None:
        assert self._session is not None
        if msg.seq > self._session.last_seq + 1:
            self.stats["link"]["seq_gap"] += msg.seq - self._session.last_seq - 1  # lost or rejected in between
        self._session.last_seq = msg.seq
        self._session.last_rx = now
        self._record(msg, now)

    def _record(self, msg: P.Message, now: float) -> None:
        """Count an accepted message (before any reply: the counters never lag what the peer has seen)."""
        self.stats["rx"][msg.kind] += 1  # rejected ones count under "dropped" (a stale chunk: in both)
        self.rx_log.append((now, msg.kind, msg.seq))

    def _on_hello(self, identity: bytes, msg: P.Message) -> None:
        proto = P.req_field(msg.body, "protocol", int, "hello")
        if proto != P.PROTOCOL_VERSION:
            raise ProtocolError("bad_version", f"client speaks protocol {proto}, agent {P.PROTOCOL_VERSION}")
        client = msg.body.get("client", "")
        if not isinstance(client, str):
            raise ProtocolError("bad_field", "hello: 'client' must be a string")
        old = self._session
        if old is not None and old.identity != identity:
            log.warning("controller %r took over from %r", client, old.client)
            self._queue.clear()  # the new controller starts from a holding robot
        now = time.monotonic()
        self._session = _Session(identity, msg.seq, now, client[:128])
        self._record(msg, now)
        self._send(identity, "spec", {
            "reply_to": msg.seq, "protocol": P.PROTOCOL_VERSION, "mode": "lockstep" if self.lockstep else "realtime",
            "robot": self.robot.to_dict(), "safety": self.safety_cfg.to_dict(), "limits": self.limits.to_dict(),
            "agent_mono": time.monotonic(), "tick": self._tick, "episode_active": self._episode_active})

    def _on_reset(self, identity: bytes, msg: P.Message) -> None:
        received = time.monotonic()
        ep = dict(P.req_field(msg.body, "episode", dict, "reset"))
        self._accept(msg, time.monotonic())
        ep["resolve_init_state"] = bool(msg.body.get("resolve_init_state", False))
        self._queue.clear()
        self.safety.reset()
        try:
            obs = self.driver.reset(ep)
        except Exception as e:  # a bad episode (unknown task...) is the client's error, reported to it
            log.warning("reset failed: %s", e)
            self._episode_active = False
            raise ProtocolError("bad_episode", f"{type(e).__name__}: {str(e)[:300]}") from e
        if self._session is not None:  # the watchdog window starts with the episode, not before the reset
            self._session.last_rx = time.monotonic()
        self._tick = 0
        self._episode_active = True
        self._episodes += 1
        self._last_outcome = Outcome()
        self._next_deadline = time.monotonic() + self.period
        body, arrays = self._obs_payload(obs)
        body["reply_to"] = msg.seq
        body["agent_ms"] = (time.monotonic() - received) * 1e3
        self._send(identity, "obs", body, arrays)

    def _obs_payload(self, obs: Observation) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        body, arrays = P.obs_to_wire(obs.images, obs.state, obs.instruction, obs.stamp, self._tick, obs.privileged)
        o = self._last_outcome
        body["result"] = {"reward": o.reward, "success": o.success, "done": o.done, "info": P.plain(o.info)}
        body["episode_active"] = self._episode_active
        body["safety_total"] = self.safety.summary()
        return body, arrays

    def _validate_chunk(self, msg: P.Message) -> tuple[np.ndarray, int, float]:
        if set(msg.arrays) != {"actions"}:
            raise ProtocolError("bad_field", "action_chunk must carry exactly one array named 'actions'")
        a = msg.arrays["actions"]
        if a.dtype != np.float32 or a.ndim != 2:
            raise ProtocolError("bad_shape", f"actions must be float32 (H, A), got {a.dtype} {list(a.shape)}")
        if not 1 <= a.shape[0] <= self.limits.max_horizon:
            raise ProtocolError("bad_shape", f"horizon {a.shape[0]} not in [1, {self.limits.max_horizon}]")
        if a.shape[1] != self.robot.action_dim:
            raise ProtocolError("bad_action_dim", f"actions have dim {a.shape[1]}, robot takes {self.robot.action_dim}")
        start = P.req_field(msg.body, "start_tick", int, "action_chunk")
        stamp = float(P.req_field(msg.body, "obs_stamp", (int, float), "action_chunk"))
        if start < 0:
            raise ProtocolError("bad_field", "action_chunk: start_tick must be >= 0")
        if not np.all(np.isfinite(a)):
            self.safety.count("non_finite", a.shape[0])
            self.safety.count("rejected_chunk")
            raise ProtocolError("non_finite", "action chunk holds NaN/inf: rejected whole")
        return a, start, stamp

    def _on_chunk(self, identity: bytes, msg: P.Message, now: float) -> None:
        if not self._episode_active:
            self._accept(msg, now)
            raise ProtocolError("episode_done" if self._episodes else "no_episode",
                                "no episode running: send reset" if not self._episodes else "episode is over: send reset")
        a, start, stamp = self._validate_chunk(msg)  # invalid chunks do not refresh the watchdog
        self._accept(msg, now)
        if self.lockstep:
            self._run_lockstep(identity, msg, a, start, stamp, now)
            return
        # realtime: queue by tick; the newest chunk replaces the queued future from its first tick on
        if start > self._tick + self.limits.max_horizon:  # bounds the queue: no plans for the far future
            self.safety.count("rejected_chunk")
            raise ProtocolError("bad_field", f"start_tick {start} is more than {self.limits.max_horizon} ticks "
                                             f"ahead of the current tick {self._tick}")
        age = now - stamp
        if age > self.safety_cfg.max_action_age_s:
            self.safety.count("stale_age", a.shape[0])
            self.safety.count("rejected_chunk")
            raise ProtocolError("stale", f"chunk answers an observation {age * 1e3:.0f} ms old "
                                         f"(max {self.safety_cfg.max_action_age_s * 1e3:.0f} ms)")
        passed = max(0, min(a.shape[0], self._tick - start))
        if passed == a.shape[0]:
            self.safety.count("tick_passed", passed)
            self.safety.count("rejected_chunk")
            raise ProtocolError("stale", f"all {passed} actions are for ticks before the current tick {self._tick}")
        self.safety.count("tick_passed", passed)
        for t in [t for t in self._queue if t >= start]:
            del self._queue[t]
        for i in range(passed, a.shape[0]):
            self._queue[start + i] = (a[i].copy(), stamp)
        self._send(identity, "ack", {"reply_to": msg.seq, "accepted": a.shape[0] - passed, "dropped": passed,
                                     "tick": self._tick})

    def _run_lockstep(self, identity: bytes, msg: P.Message, a: np.ndarray, start: int, stamp: float,
                      received: float) -> None:
        if start != self._tick:
            self.safety.count("tick_passed" if start < self._tick else "rejected_chunk")
            raise ProtocolError("stale", f"lockstep chunk starts at tick {start}, the robot is at tick {self._tick}")
        before = self.safety.summary()
        rewards = []
        for i in range(a.shape[0]):
            safe = self.safety.filter(a[i])
            try:
                self.driver.apply_action(safe)
            except Exception as e:
                self._episode_active = False
                log.exception("driver failed to apply an action")
                raise ProtocolError("internal", f"driver.apply_action failed: {type(e).__name__}: {str(e)[:300]}") from e
            self.commands.append(CommandRecord(time.monotonic(), self._tick, "action", safe, "", stamp))
            self._tick += 1
            self._last_outcome = self.driver.outcome()
            rewards.append(self._last_outcome.reward)
            if self._last_outcome.done:
                self._episode_active = False
                break
        after = self.safety.summary()
        body, arrays = self._obs_payload(self.driver.read_observation())
        o = self._last_outcome
        step_body = {"reply_to": msg.seq, "obs": body, "result": {
            "executed": len(rewards), "rewards": rewards, "reward": o.reward, "success": o.success, "done": o.done,
            "info": P.plain(o.info)}, "safety": {k: after[k] - before[k] for k in after}, "safety_total": after,
            "agent_ms": (time.monotonic() - received) * 1e3}  # time spent in the agent: the rest is transport
        self._send(identity, "step", step_body, arrays)

    # ------------------------------------------------------------------------------------- realtime tick
    def _realtime_active(self) -> bool:
        return not self.lockstep and self._episode_active

    def _tick_once(self) -> None:
        """End of period `tick`: execute its action (or hold), then capture and publish the next observation."""
        now = time.monotonic()
        k = self._tick
        for t in [t for t in self._queue if t < k]:  # cannot happen with one tick per period; defensive
            del self._queue[t]
            self.safety.count("tick_passed")
        s = self._session
        reason = ""
        if s is None:
            reason = "no_session"
            self._queue.clear()
        elif now - s.last_rx > self.watchdog_s:
            reason = "watchdog"
            if self._queue:
                self._queue.clear()
            self.safety.count("watchdog")
        item = self._queue.pop(k, None) if not reason else None
        if not reason and item is None:
            reason = "starved"
            self.safety.count("starved")
        if item is not None and now - item[1] > self.safety_cfg.max_action_age_s:
            self.safety.count("stale_age")
            reason, item = "stale_age", None
        try:
            if item is None:
                held = self.safety.held()
                self.driver.hold()
                self.commands.append(CommandRecord(now, k, "hold", held, reason))
            else:
                safe = self.safety.filter(item[0])
                self.driver.apply_action(safe)
                self.commands.append(CommandRecord(now, k, "action", safe, "", item[1]))
            self._last_outcome = self.driver.outcome()
            obs = self.driver.read_observation()
        except Exception:
            self._episode_active = False
            log.exception("driver failed during a control tick: episode stopped")
            if s is not None:
                self._send_error(s.identity, ProtocolError("internal", "driver failed during a control tick"), None)
            return
        self._tick = k + 1
        if self._last_outcome.done:
            self._episode_active = False
        self._next_deadline += self.period
        if time.monotonic() > self._next_deadline + self.period:  # fell behind: resync, never burst ticks
            self._overruns += 1
            self._next_deadline = time.monotonic() + self.period
        if s is not None:
            body, arrays = self._obs_payload(obs)
            self._send(s.identity, "obs", body, arrays)


# ----------------------------------------------------------------------------------------------- entry point

def make_driver(env: str, image_size: int = 128, exact_image_size: bool = False,
                cameras: tuple[str, ...] | None = None) -> SimDriver:
    """A SimDriver over make_env(env): the same env an in-process eval of `env` would build.

    `exact_image_size` lets dummy:reach render at `image_size` (make_env caps it at 64 px): for the bridge
    benchmark, which needs realistic 128 px payloads.
    """
    if env == "dummy:reach" and exact_image_size:
        from vla_runtime.envs.dummy import DummyReachEnv

        return SimDriver(DummyReachEnv(cameras=cameras, image_size=image_size))
    from vla_runtime.envs import make_env

    return SimDriver(make_env(env, cameras=cameras, image_size=image_size))


def run_robot_agent(env: str, bind: str = "tcp://127.0.0.1:5555", keys_dir: str | None = None,
                    lockstep: bool = False, max_action_age_ms: float = 500.0, *, image_size: int = 128,
                    max_delta_frac: float | None = 0.5, watchdog_periods: float = 2.0, takeover_s: float = 1.0,
                    stop: threading.Event | None = None, quiet: bool = False, exact_image_size: bool = False,
                    cameras: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Serve `env` (a simulator standing in for a robot) on `bind` until Ctrl-C (or `stop`); returns the summary.

    The simulator is built like an in-process eval builds it (make_env with `cameras` and `image_size`):
    the cameras and image size a remote policy gets are fixed here, on the robot side.
    Refuses a non-loopback bind without CurveZMQ keys (UserError).
    """
    from vla_runtime.errors import UserError

    if max_action_age_ms <= 0:
        raise UserError("--max-action-age-ms must be > 0")
    if not is_local_endpoint(bind) and keys_dir is None:  # before building a simulator
        raise UserError(f"refusing to bind {bind} without CurveZMQ keys: pass --keys DIR (create keys with "
                        "`vla-runtime keys --out DIR`) or bind tcp://127.0.0.1:PORT")
    safety = SafetyConfig(max_action_age_s=max_action_age_ms / 1e3, max_delta_frac=max_delta_frac,
                          watchdog_periods=watchdog_periods)
    driver = make_driver(env, image_size, exact_image_size, cameras)
    agent = RobotAgent(driver, bind, lockstep=lockstep, safety=safety, keys_dir=keys_dir, takeover_s=takeover_s)
    if not quiet:
        print(f"robot agent: {env} on {bind} ({'lockstep' if lockstep else 'realtime'} mode, "
              f"{driver.spec().control_hz:g} Hz, CURVE {'on' if keys_dir else 'off'}); Ctrl-C to stop", flush=True)
    try:
        summary = agent.run(stop)
    except KeyboardInterrupt:
        summary = agent.summary()
    finally:
        driver.close()
    if not quiet:
        import json

        print(json.dumps(summary, indent=1), flush=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    """`python -m vla_runtime.bridges.agent --env dummy:reach --bind tcp://127.0.0.1:5555 [--lockstep]`."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--env", default="dummy:reach")
    ap.add_argument("--bind", default="tcp://127.0.0.1:5555")
    ap.add_argument("--keys", dest="keys_dir", default=None, help="CurveZMQ keys directory (vla-runtime keys)")
    ap.add_argument("--lockstep", action="store_true")
    ap.add_argument("--max-action-age-ms", type=float, default=500.0)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--cameras", default=None, help="comma-separated camera names (default: the env's)")
    ap.add_argument("--exact-image-size", action="store_true", help="dummy:reach: render at --image-size (> 64)")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    import signal

    def _term(signum: int, frame: Any) -> None:  # SIGTERM (service managers, kill) stops as cleanly as Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    run_robot_agent(a.env, a.bind, a.keys_dir, a.lockstep, a.max_action_age_ms, image_size=a.image_size,
                    quiet=a.quiet, exact_image_size=a.exact_image_size,
                    cameras=tuple(a.cameras.split(",")) if a.cameras else None)


if __name__ == "__main__":
    main()
