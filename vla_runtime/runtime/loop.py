"""The control loop: one episode of env <-> policy, sync or async, on one of three clocks.

Clocks
  unpaced  as fast as possible: inference is instantaneous in env time (evaluation of success).
  sim      paced in simulated real time: the world advances one control period per tick and the runtime's
           compute time (inference, loop overhead) is charged against it, while the simulator's own step time
           is not (a real robot's controller runs in parallel with us; a CPU simulator would otherwise look
           like a slow robot). An inference of X ms started after observation k is ready for tick
           k + ceil(X / P) - 1 (the observation arrives at the start of a period, the action is due at its
           end); every tick with nothing queued is a deadline miss and the robot holds. This is a discrete-
           event simulation of real time: exact, deterministic given latencies, and it wastes no wall time.
  wall     paced by the wall clock (real robots, the bridge): inference runs in a worker thread, the loop
           sleeps until each tick's deadline and holds when no action is ready.

Modes
  sync     infer when the queue is empty; execute n_action_steps of the chunk.
  async    start the next inference while the current chunk executes (after VLASH), when the queue depth drops
           to the trigger: max(async_trigger, expected latency in ticks + 1) with `adaptive_trigger` (the new
           chunk then lands just before the queue runs dry: no stall), else async_trigger. Each chunk is aligned
           by ticks (actions whose tick passed while inferring are dropped) and contributes at most
           max(n_action_steps, latency + 1) actions, the open-loop horizon the policy was trained to execute;
           async_trigger >= the chunk size replans back to back (lowest reaction latency). With
           `future_state`, the observation's state is rolled forward by the actions that will execute during
           the expected latency and the chunk's first action is aligned to that future tick (VLASH; only right
           for a policy trained with such offsets). Without it, the observation carries `committed_actions`
           (the queued actions for the ticks the inference will take), which a policy may inpaint as the start
           of its chunk so the new plan continues from what the robot really does (real-time chunking).

Policies may define `observe(obs)`: the loop calls it with every tick's observation (not only those it acts
on), so a policy with an observation history sees the frames it was trained on.

Metrics: `reaction_ms` is capture -> first executed action per chunk; `event_reaction_ms` is what a user feels:
for a change in the world at each tick, the time until the robot executes the first action computed from an
observation that saw it (in sync this includes finishing the current chunk; VLASH's "reaction latency").
`stall_ticks` counts ticks the robot held after its first action (sync stalls at every chunk boundary when
inference takes a period or more; async should not).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np

from vla_runtime.envs.base import Env, EpisodeSpec, check_action
from vla_runtime.runtime.queue import ActionQueue, BlendMode
from vla_runtime.runtime.types import ActionChunk, Observation, Policy

Clock = Literal["unpaced", "sim", "wall"]
Mode = Literal["sync", "async"]

# OSC_POSE delta: metres / radians per unit action (robosuite & LIBERO defaults), for future-state roll-forward.
DEFAULT_DELTA_SCALE = (0.05, 0.05, 0.05, 0.5, 0.5, 0.5)
WALL_MARGIN_S = 0.002  # wall clock: leave this much of a period to hand the action over


@dataclass(frozen=True)
class LoopConfig:
    """How the runtime drives one episode."""

    clock: Clock = "unpaced"
    mode: Mode = "sync"
    n_action_steps: int | None = None  # actions executed per chunk (sync); None: the policy's spec
    async_trigger: int = 2  # async: start the next inference when this many actions (or fewer) remain queued
    adaptive_trigger: bool = True  # async: raise the trigger to the expected latency (ticks) + 1
    blend: BlendMode = "latest"  # how an arriving chunk merges with queued actions
    blend_new_weight: float = 0.5
    future_state: bool = True  # async: condition on the state rolled forward over the expected latency
    pass_committed: bool = True  # async: hand the policy the actions that execute while it infers
    delta_scale: tuple[float, ...] = DEFAULT_DELTA_SCALE
    max_steps: int | None = None  # None: the task's max_steps
    record_camera: str | None = None  # camera whose frames are kept for video
    latency_ms: float | None = None  # sim clock: charge this instead of the measured inference time (tests)

    def __post_init__(self) -> None:
        if self.clock not in ("unpaced", "sim", "wall"):
            raise ValueError(f"clock must be unpaced, sim or wall, got {self.clock!r}")
        if self.mode not in ("sync", "async"):
            raise ValueError(f"mode must be sync or async, got {self.mode!r}")
        if self.async_trigger < 0:
            raise ValueError("async_trigger must be >= 0")
        if self.mode == "async" and self.clock == "unpaced":
            raise ValueError("async inference needs a paced clock (sim or wall): unpaced inference is instantaneous")


@dataclass
class TickRecord:
    step: int
    action_ready: bool  # False: deadline miss, the robot held
    queue_depth: int  # actions queued after this tick's pop
    inference_ms: float | None  # set on the tick an inference result arrived
    tick_ms: float  # wall time of the whole tick (incl. env step)
    overhead_ms: float  # wall time of the tick minus env step and inference


@dataclass
class EpisodeResult:
    spec: EpisodeSpec
    success: bool
    steps: int
    ticks: list[TickRecord]
    inference_ms: list[float]
    chunk_infos: list[dict[str, Any]]
    wall_s: float  # whole episode incl. reset
    loop_s: float = 0.0  # control loop only (ticks), the basis of loop_hz
    period_ms: float = 0.0  # control period of the env
    frames: list[np.ndarray] = field(default_factory=list)
    chunk_switches: int = 0
    dropped_actions: int = 0
    replans: int = 0
    chunk_starts: list[tuple[int, int]] = field(default_factory=list)  # (obs tick, tick of its first executed action)
    safety: dict[str, int] = field(default_factory=dict)  # interventions reported by a robot agent (remote envs)
    # CPU time of each inference (see _Inference): on a shared machine wall time grows with the other jobs' load,
    # CPU time much less, so ratios between methods stay comparable
    inference_cpu_ms: list[float] = field(default_factory=list)

    @property
    def reaction_ms(self) -> list[float]:
        """Per executed chunk: its observation's capture -> its first executed action (to the end of that period)."""
        return [(e - o + 1) * self.period_ms for o, e in self.chunk_starts]

    @property
    def deadline_misses(self) -> int:
        return sum(not t.action_ready for t in self.ticks)

    @property
    def stall_ticks(self) -> int:
        """Ticks the robot held after it first moved (the first inference of an episode is not a stall)."""
        first = next((i for i, t in enumerate(self.ticks) if t.action_ready), len(self.ticks))
        return sum(not t.action_ready for t in self.ticks[first:])

    @property
    def event_reaction_ms(self) -> float | None:
        """Mean over ticks t of: a world change just before observation t -> first executed action computed from
        an observation at or after t (ticks counted to the end of that action's period)."""
        starts = sorted(self.chunk_starts)
        if not starts or not self.period_ms:
            return None
        # a later observation's chunk may start executing before an earlier one's: take suffix minima
        suffix_min = [e for _, e in starts]
        for i in range(len(starts) - 2, -1, -1):
            suffix_min[i] = min(suffix_min[i], suffix_min[i + 1])
        vals, j = [], 0
        for t in range(starts[0][0], self.steps):
            while j < len(starts) and starts[j][0] < t:
                j += 1
            if j == len(starts):
                break
            vals.append((suffix_min[j] - t + 1) * self.period_ms)
        return float(np.mean(vals)) if vals else None

    def to_record(self) -> dict[str, Any]:
        """The JSON line written to episodes.jsonl."""
        from vla_runtime.runtime.metrics import percentiles

        inf = percentiles(self.inference_ms)
        ovh = percentiles([t.overhead_ms for t in self.ticks])
        rec: dict[str, Any] = {
            **self.spec.to_dict(),
            "success": bool(self.success),
            "steps": self.steps,
            "inferences": len(self.inference_ms),
            "deadline_misses": self.deadline_misses,
            "wall_s": round(self.wall_s, 4),
            "loop_s": round(self.loop_s, 4),
            "loop_hz": round(self.steps / self.loop_s, 3) if self.loop_s > 0 else None,
            "inference_ms": [round(x, 3) for x in self.inference_ms],
            "inference_ms_p50": inf["p50"],
            "inference_ms_p95": inf["p95"],
            "inference_cpu_ms": [round(x, 3) for x in self.inference_cpu_ms],
            "overhead_ms_p50": ovh["p50"],
            "overhead_ms_p99": ovh["p99"],
            "reaction_ms_mean": float(np.mean(self.reaction_ms)) if self.reaction_ms else None,
            "chunk_switches": self.chunk_switches,
            "dropped_actions": self.dropped_actions,
            "replans": self.replans,
            "stall_ticks": self.stall_ticks,
            "event_reaction_ms_mean": self.event_reaction_ms,
        }
        if self.safety:
            rec["safety"] = dict(self.safety)
        rec["accel"] = summarize_chunk_infos(self.chunk_infos)
        return rec


def summarize_chunk_infos(infos: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of every numeric field policies report per chunk (tokens kept, exit layer, denoise steps...)."""
    keys: dict[str, list[float]] = {}
    for info in infos:
        for k, v in info.items():
            if isinstance(v, (bool, int, float, np.integer, np.floating)) and not isinstance(v, str):
                keys.setdefault(k, []).append(float(v))
    return {f"mean_{k}": round(float(np.mean(v)), 4) for k, v in keys.items()}


class _Inference:
    """One inference at a time; result readiness measured in ticks (sim) or wall time (wall)."""

    def __init__(self, policy: Policy, cfg: LoopConfig, period_s: float) -> None:
        self.policy = policy
        self.cfg = cfg
        self.period_s = period_s
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vla-infer") if cfg.clock == "wall" else None
        self._future: Future[ActionChunk] | None = None
        self._ready_tick: int | None = None
        self._result: ActionChunk | None = None
        self._start_tick = 0
        self._lead = 0
        self._ms = 0.0
        self._cpu_ms = 0.0
        self._t0 = 0.0
        self.recent_latency_ticks: list[int] = []

    @property
    def busy(self) -> bool:
        return self._future is not None or self._result is not None

    def start(self, obs: Observation, tick: int, lead: int) -> None:
        """Infer from `obs` (captured just before `tick`); the chunk's first action is meant for tick + lead."""
        self._start_tick, self._lead = tick, lead
        if self._pool is not None:
            self._t0 = time.perf_counter()
            self._future = self._pool.submit(self._act_timed, obs)
            return
        t0, c0 = time.perf_counter(), time.process_time()
        self._result = self.policy.act(obs)
        self._ms = (time.perf_counter() - t0) * 1e3
        self._cpu_ms = (time.process_time() - c0) * 1e3  # every thread of the process: the loop waits meanwhile
        if self.cfg.clock == "unpaced":
            self._ready_tick = tick
        else:
            ms = self._ms if self.cfg.latency_ms is None else self.cfg.latency_ms
            self._ready_tick = tick + max(0, math.ceil(ms / (self.period_s * 1e3) - 1e-9) - 1)

    def _act_timed(self, obs: Observation) -> ActionChunk:
        """Worker-thread inference; CPU time of this thread only (the loop thread runs meanwhile), which misses
        torch's extra intra-op threads when there are any."""
        c0 = time.thread_time()
        chunk = self.policy.act(obs)
        self._cpu_ms = (time.thread_time() - c0) * 1e3
        return chunk

    @property
    def cpu_ms(self) -> float:
        """CPU time of the inference poll() returned last."""
        return self._cpu_ms

    def poll(self, tick: int) -> tuple[ActionChunk, float, int, int] | None:
        """(chunk, inference ms, start tick, lead) if the in-flight inference is ready for `tick`."""
        if self._future is not None:
            if not self._future.done():
                return None
            self._ms = (time.perf_counter() - self._t0) * 1e3
            chunk = self._future.result()  # re-raises a policy error in the loop thread
            self._future = None
            self.recent_latency_ticks.append(max(0, tick - self._start_tick))
            return chunk, self._ms, self._start_tick, self._lead
        if self._result is not None and self._ready_tick is not None and tick >= self._ready_tick:
            chunk, self._result = self._result, None
            self.recent_latency_ticks.append(self._ready_tick - self._start_tick)
            return chunk, self._ms, self._start_tick, self._lead
        return None

    def wait_until(self, deadline: float) -> None:
        """Wall clock: block until the in-flight inference is done or `deadline` (perf_counter seconds)."""
        if self._future is not None:
            from concurrent.futures import wait

            wait([self._future], timeout=max(0.0, deadline - time.perf_counter()))

    def expected_latency_ticks(self) -> int:
        r = self.recent_latency_ticks[-5:]
        return int(np.max(r)) if r else 0

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def roll_state_forward(state: np.ndarray, pending: np.ndarray, delta_scale: tuple[float, ...]) -> np.ndarray:
    """Future-state awareness for delta actions: state + the motion of the actions that execute meanwhile.

    state: (S,) with eef pos (3) + axis-angle (3) first; pending: (n, A) delta actions. Rotation deltas are
    added in axis-angle space (first order, exact for the small per-step rotations of OSC deltas).
    """
    s = np.array(state, dtype=np.float32, copy=True)
    if pending.size == 0:
        return s
    k = min(len(delta_scale), s.shape[0], pending.shape[1] - 1)
    s[:k] += pending[:, :k].sum(axis=0) * np.asarray(delta_scale[:k], np.float32)
    return s


def run_episode(env: Env, policy: Policy, episode: EpisodeSpec, cfg: LoopConfig = LoopConfig(),
                on_tick: Callable[[TickRecord], None] | None = None) -> EpisodeResult:
    """Run one episode; returns its result (never raises for a failed episode; raises on broken inputs)."""
    task = env.task_info(episode.task)
    max_steps = cfg.max_steps or task.max_steps
    period_s = 1.0 / env.spec.control_hz
    n_exec = cfg.n_action_steps or policy.spec.n_action_steps
    if policy.spec.action_dim != env.spec.action_dim:
        from vla_runtime.errors import UserError

        raise UserError(f"policy {policy.spec.name} outputs {policy.spec.action_dim}-d actions, "
                        f"env {env.spec.name} takes {env.spec.action_dim}-d")
    queue = ActionQueue(cfg.blend, cfg.blend_new_weight)
    infer = _Inference(policy, cfg, period_s)
    hold = env.hold_action()
    ticks: list[TickRecord] = []
    inference_ms: list[float] = []
    inference_cpu_ms: list[float] = []
    infos: list[dict[str, Any]] = []
    frames: list[np.ndarray] = []
    awaiting_reaction: list[tuple[int, int]] = []  # (obs tick, first tick of its chunk)
    switches = dropped = replans = 0
    on_action = getattr(policy, "on_action", None)
    observe = getattr(policy, "observe", None)
    chunk_starts: list[tuple[int, int]] = []
    safety: dict[str, int] = {}
    paces_itself = bool(getattr(env, "paces_itself", False))  # a real-time robot agent blocks until its tick

    wall0 = time.perf_counter()
    obs = env.reset(episode)
    policy.reset(obs.instruction)
    t_start = t_obs = time.perf_counter()
    success = False
    step = 0
    try:
        while step < max_steps:
            t_tick = time.perf_counter()
            if cfg.record_camera is not None and cfg.record_camera in obs.images:
                frames.append(obs.images[cfg.record_camera])
            inf_this_tick: float | None = None
            inf_wall = 0.0
            if observe is not None:
                observe(obs)

            def _collect() -> None:
                nonlocal inf_this_tick, switches, dropped
                got = infer.poll(step)
                if got is None:
                    return
                chunk, ms, start_tick, lead = got
                acts = chunk.actions
                if acts.shape[1] != env.spec.action_dim:
                    from vla_runtime.errors import UserError

                    raise UserError(f"policy returned actions of dim {acts.shape[1]}, env takes {env.spec.action_dim}")
                if cfg.mode == "sync":
                    acts = acts[:n_exec]
                    first = step  # the robot held while we inferred: the chunk starts now
                else:
                    first = start_tick + lead
                    # the open-loop horizon the policy was trained for, but never shorter than the latency
                    keep = max(n_exec, infer.expected_latency_ticks() + 1)
                    acts = acts[: max(0, step - first) + keep]
                if queue.depth(step) > 0:
                    switches += 1
                dropped += queue.put(acts, first, step)
                inference_ms.append(ms)
                inference_cpu_ms.append(infer.cpu_ms)
                infos.append(chunk.info)
                inf_this_tick = ms
                awaiting_reaction.append((start_tick, max(first, step)))

            _collect()
            depth = queue.depth(step)
            lat = infer.expected_latency_ticks()
            if cfg.mode == "sync":
                want = depth == 0
            else:
                want = depth <= (max(cfg.async_trigger, lat + 1) if cfg.adaptive_trigger else cfg.async_trigger)
            if want and not infer.busy:
                t_inf = time.perf_counter()
                lead = 0
                o = obs
                if cfg.mode == "async":
                    lead = lat if cfg.future_state else 0
                    if cfg.future_state and lead > 0:
                        pend = queue.pending(step)[:lead]
                        o = dataclasses.replace(obs, state=roll_state_forward(obs.state, pend, cfg.delta_scale))
                    elif cfg.pass_committed and lat > 0 and queue.depth(step) > 0:
                        # the chunk's first `lat` ticks are already spoken for by the queued actions
                        o = dataclasses.replace(obs, committed_actions=queue.pending(step)[:lat])
                infer.start(o, step, lead)
                if cfg.clock == "wall" and cfg.mode == "sync":
                    # the observation arrived at the start of this period; its action is due at the end of it
                    infer.wait_until(t_obs + period_s - WALL_MARGIN_S)
                _collect()
                inf_wall = (time.perf_counter() - t_inf) * 1e3 if cfg.clock != "wall" else 0.0

            action = queue.pop(step)
            ready = action is not None
            if action is None:
                action = hold
            else:
                action = check_action(action, env.spec)
                if on_action is not None and on_action(action) and cfg.mode == "sync":
                    replans += 1
                    queue.clear()  # the policy asked to replan: infer again at the next tick
            while awaiting_reaction and awaiting_reaction[0][1] <= step and ready:
                obs_tick, _ = awaiting_reaction.pop(0)
                chunk_starts.append((obs_tick, step))
            sleep_ms = 0.0
            if cfg.clock == "wall" and not paces_itself:
                delay = t_start + (step + 1) * period_s - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                    sleep_ms = delay * 1e3
            t_env = time.perf_counter()
            res = env.step(action)
            t_obs = time.perf_counter()
            for k, v in ((res.info or {}).get("safety") or {}).items():  # the agent's per-step intervention counts
                if isinstance(v, int) and v:
                    safety[k] = safety.get(k, 0) + v
            env_ms = (t_obs - t_env) * 1e3
            obs = res.obs
            step += 1
            tick_ms = (time.perf_counter() - t_tick) * 1e3
            rec = TickRecord(step=step, action_ready=ready, queue_depth=queue.depth(step),
                             inference_ms=inf_this_tick, tick_ms=tick_ms,
                             overhead_ms=max(0.0, tick_ms - env_ms - inf_wall - sleep_ms))
            ticks.append(rec)
            if on_tick is not None:
                on_tick(rec)
            if res.success:
                success = True
            if res.done:
                break
    finally:
        infer.close()
    return EpisodeResult(spec=episode, success=success, steps=step, ticks=ticks, inference_ms=inference_ms,
                         inference_cpu_ms=inference_cpu_ms,
                         chunk_infos=infos, wall_s=time.perf_counter() - wall0,
                         loop_s=time.perf_counter() - t_start,
                         frames=frames, chunk_switches=switches, dropped_actions=dropped,
                         replans=replans, chunk_starts=chunk_starts, period_ms=period_s * 1e3, safety=safety)
