"""Test helpers for the bridge: a recording fake robot, a free-port helper and a seeded frame mutator.

They live in the package (not in tests/) because they are useful to anyone writing a driver or a client in
another language: `FrameMutator` is the malformed-input generator the agent and client are fuzzed with.
"""

from __future__ import annotations

import math
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from vla_runtime.bridges import protocol as P
from vla_runtime.bridges.agent import Outcome
from vla_runtime.bridges.protocol import RobotSpec
from vla_runtime.runtime.types import Observation


def free_tcp_endpoint() -> str:
    """tcp://127.0.0.1:PORT on a port free right now (loopback only)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


@dataclass
class FakeDriver:
    """A robot that never ends its episode and logs every actuator command with its monotonic time.

    `applied` holds (t, action) for apply_action calls only: the "actuators" of the fuzz and fault tests.
    """

    action_dim: int = 7
    state_dim: int = 8
    image_size: int = 16
    control_hz: float = 50.0
    cameras: tuple[str, ...] = ("agentview",)
    applied: list[tuple[float, np.ndarray]] = field(default_factory=list)
    holds: list[float] = field(default_factory=list)
    resets: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _step: int = 0

    def spec(self) -> RobotSpec:
        return RobotSpec(name="fake", action_dim=self.action_dim, action_low=(-1.0,) * self.action_dim,
                         action_high=(1.0,) * self.action_dim, cameras=self.cameras, image_size=self.image_size,
                         state_dim=self.state_dim, control_hz=self.control_hz, hold_action=(0.0,) * self.action_dim,
                         tasks=(("hover", "stay still", 10_000, 0),))

    def reset(self, episode: dict[str, Any]) -> Observation:
        if episode.get("task") not in ("hover",):
            raise KeyError(f"unknown task {episode.get('task')!r}")
        self.resets += 1
        self._step = 0
        return self.read_observation()

    def read_observation(self) -> Observation:
        s = self.image_size
        imgs = {c: np.full((s, s, 3), self._step % 256, np.uint8) for c in self.cameras}
        return Observation(images=imgs, state=np.full(self.state_dim, self._step, np.float32), instruction="stay still",
                           stamp=time.monotonic(), step=self._step, privileged={"task": "hover"})

    def apply_action(self, action: np.ndarray) -> None:
        with self._lock:
            self.applied.append((time.monotonic(), np.array(action, np.float32, copy=True)))
        self._step += 1

    def hold(self) -> None:
        with self._lock:
            self.holds.append(time.monotonic())
        self._step += 1

    def outcome(self) -> Outcome:
        return Outcome()

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------- fuzzing

def header(kind: str, seq: int, body: dict[str, Any] | None = None, descs: list[Any] | None = None,
           v: Any = P.PROTOCOL_VERSION) -> dict[str, Any]:
    return {"v": v, "kind": kind, "seq": seq, "t_mono": time.monotonic(), "t_wall": time.time(),
            "arrays": descs if descs is not None else [], "body": body if body is not None else {}}


def desc(name: str, a: np.ndarray) -> list[Any]:
    dn = {np.dtype(v): k for k, v in P.DTYPES.items()}[a.dtype]
    return [name, dn, list(a.shape), int(a.nbytes)]


def pack(h: Any) -> bytes:
    return msgpack.packb(h, use_bin_type=True)


class FrameMutator:
    """Seeded generator of malformed messages derived from a valid template message.

    Every message it returns is invalid by construction (categories below), with the error codes a correct
    receiver may answer it with. `template` is (kind, body, arrays) of a valid message the receiver would
    accept at this point; `replayable` are frames of messages it already accepted (their seq is spent).
    """

    CATEGORIES = ("garbage", "truncated", "flipped", "non_map", "bad_version", "unknown_kind", "bad_dtype",
                  "size_mismatch", "bad_shape", "too_many_arrays", "oversized", "frame_count", "replay",
                  "bad_seq", "bad_stamp", "deep", "ext", "bin", "long_string", "header_too_large")

    def __init__(self, seed: int, template: tuple[str, dict[str, Any], dict[str, np.ndarray]],
                 wrong_kinds: tuple[str, ...], limits: P.Limits, replayable: list[list[bytes]],
                 extra: dict[str, Any] | None = None) -> None:
        self.rng = random.Random(seed)
        self.template = template
        self.wrong_kinds = wrong_kinds
        self.limits = limits
        self.replayable = replayable
        self.extra = extra or {}  # category -> callable(seq) -> (frames, codes): receiver-specific invalid cases

    def _valid(self, seq: int) -> tuple[dict[str, Any], list[bytes]]:
        kind, body, arrays = self.template
        descs = [desc(k, a) for k, a in arrays.items()]
        return header(kind, seq, dict(body), descs), [a.tobytes() for a in arrays.values()]

    def __call__(self, seq: int) -> tuple[str, list[bytes], set[str]]:
        """(category, frames, acceptable error codes) for one malformed message using sequence number `seq`."""
        cats = self.CATEGORIES + tuple(self.extra)
        cat = self.rng.choice(cats)
        r = self.rng
        h, data = self._valid(seq)
        if cat in self.extra:
            frames, codes = self.extra[cat](seq, r)
            return cat, frames, codes
        if cat == "garbage":
            raw = bytes(r.getrandbits(8) for _ in range(r.randint(0, 64)))
            return cat, [raw, *data[: r.randint(0, 1)]], {"bad_header", "frame_count", "bad_version", "unknown_kind"}
        if cat == "truncated":
            full = pack(h)
            return cat, [full[: r.randint(0, len(full) - 1)], *data], {"bad_header"}
        if cat == "flipped":
            for _ in range(100):
                b = bytearray(pack(h))
                for _ in range(r.randint(1, 4)):
                    i = r.randrange(len(b))
                    b[i] ^= 1 << r.randrange(8)
                try:
                    P.decode([bytes(b), *data], self.limits)
                except P.ProtocolError:
                    return cat, [bytes(b), *data], set(P.ERROR_CODES)
            return cat, [b"\xc1"], {"bad_header"}  # 0xc1 is never valid msgpack
        if cat == "non_map":
            x = r.choice([[1, 2, 3], 7, "hello", None, True, 1.5, [h]])
            return cat, [pack(x)], {"bad_header"}
        if cat == "bad_version":
            h["v"] = r.choice([0, 1, P.PROTOCOL_VERSION + 1, 99, -1, 2**40])  # 1: the previous version
            return cat, [pack(h), *data], {"bad_version"}
        if cat == "unknown_kind":
            h["kind"] = r.choice([*self.wrong_kinds, "pickle", "", "HELLO", "x" * 100])
            return cat, [pack(h), *data], {"unknown_kind"}
        if cat == "bad_dtype":
            if not h["arrays"]:
                h["arrays"] = [["x", "float32", [1], 4]]
                data = [b"\0" * 4]
            h["arrays"][0][1] = r.choice(["float16", "object", "O", ">f4", "<f4", "complex64", "str", "int8", "V8"])
            return cat, [pack(h), *data], {"bad_dtype"}
        if cat == "size_mismatch":
            if not h["arrays"]:
                h["arrays"] = [["x", "float32", [2], 8]]
                data = [b"\0" * 8]
            j = r.randrange(3)
            if j == 0:
                h["arrays"][0][3] += r.choice([-1, 1, 4])
            elif j == 1:
                data = [data[0][: max(0, len(data[0]) - r.randint(1, 4))], *data[1:]]
            else:
                data = [data[0] + b"\0" * r.randint(1, 8), *data[1:]]
            return cat, [pack(h), *data], {"size_mismatch"}
        if cat == "bad_shape":
            if not h["arrays"]:
                h["arrays"] = [["x", "float32", [2], 8]]
                data = [b"\0" * 8]
            h["arrays"][0][2] = r.choice([[-1], [1, -7], [self.limits.max_dim + 1], [1] * (self.limits.max_ndim + 1),
                                          "abc", [1.5], [True]])
            return cat, [pack(h), *data], {"bad_shape"}
        if cat == "too_many_arrays":
            n = self.limits.max_arrays + 1
            h["arrays"] = [[f"a{i}", "uint8", [1], 1] for i in range(n)]
            return cat, [pack(h), *[b"\0"] * n], {"frame_count", "too_large"}
        if cat == "oversized":
            n = self.limits.max_array_bytes // 4 + r.randint(1, 64)
            h["arrays"] = [["actions", "float32", [n, 1], n * 4]]
            return cat, [pack(h), b"\0" * (n * 4)], {"too_large", "bad_shape"}
        if cat == "frame_count":
            if data and r.random() < 0.5:
                return cat, [pack(h), *data[:-1]], {"frame_count"}
            return cat, [pack(h), *data, b"\0" * r.randint(0, 8)], {"frame_count"}
        if cat == "replay":
            if not self.replayable:
                return cat, [b""], {"bad_header"}
            return cat, list(r.choice(self.replayable)), {"replay", "busy"}
        if cat == "bad_seq":
            h["seq"] = r.choice([-1, "7", 1.5, None, 2**63, True])
            return cat, [pack(h), *data], {"bad_header"}
        if cat == "bad_stamp":
            h[r.choice(["t_mono", "t_wall"])] = r.choice([math.nan, math.inf, "now", None])
            return cat, [pack(h), *data], {"bad_header"}
        if cat == "deep":
            x: Any = 1
            for _ in range(self.limits.max_depth + r.randint(1, 40)):
                x = [x]
            h["body"] = {"x": x}
            return cat, [pack(h), *data], {"bad_header"}
        if cat == "ext":
            h["body"] = {"x": msgpack.ExtType(r.randint(0, 127), b"abc")}
            return cat, [pack(h), *data], {"bad_header"}
        if cat == "bin":
            h["body"] = {"x": b"\x80\x04pickle"}
            return cat, [pack(h), *data], {"bad_header"}
        if cat == "long_string":
            h["body"] = dict(h["body"], x="y" * (self.limits.max_str_len + 1))
            return cat, [pack(h), *data], {"too_large", "header_too_large"}
        if cat == "header_too_large":
            h["body"] = dict(h["body"], pad=["z" * 100] * (self.limits.max_header_bytes // 100 + 1))
            return cat, [pack(h), *data], {"header_too_large"}
        raise AssertionError(cat)
