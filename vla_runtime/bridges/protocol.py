"""The bridge wire format: one msgpack header frame followed by raw array frames (see docs/PROTOCOL.md).

Why this shape: the header is small, self-describing and language-neutral (msgpack has decoders everywhere),
and the bulk data (camera images, action chunks) travels as raw little-endian bytes that are sent without a
copy (`copy=False`) and viewed without a copy on receipt (`np.frombuffer`). Nothing on the wire is ever
unpickled or evaluated: every message is checked against a fixed schema (kind whitelist, dtype whitelist,
shape and size limits, sequence numbers) before any array is touched, and a rejected message becomes a
`ProtocolError` whose `code` is one of `ERROR_CODES`, so both ends can count drops by reason.

This module imports only numpy, msgpack (and zmq for frames): the robot side must stay free of model code.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterable, Sequence

import msgpack
import numpy as np

from vla_runtime.envs.base import EnvSpec

# 2: privileged arrays travel packed, one frame per dtype, referenced as {"$view": ...} slices (v1 sent one
# frame per array, so a LIBERO observation (~50 arrays) exceeded max_arrays and was dropped by the client).
PROTOCOL_VERSION = 2

# Message kinds. client -> agent: hello, reset, action_chunk, heartbeat, bye.
# agent -> client: spec, obs, step, ack, error, bye.
KINDS = ("hello", "spec", "reset", "obs", "action_chunk", "step", "ack", "heartbeat", "error", "bye")
CLIENT_KINDS = frozenset({"hello", "reset", "action_chunk", "heartbeat", "bye"})
AGENT_KINDS = frozenset({"spec", "obs", "step", "ack", "error", "bye", "heartbeat"})

# Only plain little-endian numeric dtypes: no object, string, void/structured or big-endian arrays ever.
DTYPES: dict[str, np.dtype] = {
    "uint8": np.dtype("<u1"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "bool": np.dtype("?"),
}

# Reason codes of ProtocolError / error messages / drop counters (documented in docs/PROTOCOL.md).
ERROR_CODES = {
    "frame_count": "too few or too many frames for the header's array list",
    "header_too_large": "header frame exceeds the header size limit",
    "bad_header": "header is not a valid msgpack map with the required fields",
    "bad_version": "protocol version not supported",
    "unknown_kind": "message kind not in the kind whitelist (or not allowed in this direction)",
    "bad_field": "a header/body field is missing or has the wrong type or value",
    "bad_dtype": "array dtype not in the whitelist",
    "bad_shape": "array shape invalid (negative, too many dims, or not what this kind requires)",
    "too_large": "array or message exceeds the size limits",
    "size_mismatch": "array frame length differs from its descriptor (dtype x shape = nbytes)",
    "replay": "sequence number not greater than the last accepted one (replayed or out of order)",
    "non_finite": "action chunk holds NaN or inf",
    "bad_action_dim": "action chunk has the wrong action dimension",
    "stale": "action chunk is older than the configured maximum age, or all its ticks have passed",
    "no_session": "no handshake from this peer (send hello first)",
    "busy": "another controller holds the session",
    "no_episode": "no episode running (send reset first)",
    "episode_done": "the episode is over (send reset)",
    "bad_episode": "reset episode rejected by the robot",
    "internal": "the agent failed to execute a valid request (see reason)",
}


class ProtocolError(Exception):
    """A message was rejected. `code` is a key of ERROR_CODES; `reason` a one-line human explanation."""

    def __init__(self, code: str, reason: str = "") -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown protocol error code {code!r}")
        self.code = code
        self.reason = reason or ERROR_CODES[code]
        super().__init__(f"[{code}] {self.reason}")


@dataclass(frozen=True)
class Limits:
    """Bounds checked on every received message before any array is built (DoS and bug guard).

    Defaults allow four 1024 px RGB cameras per message; lower them for tests and fuzzing.
    """

    max_header_bytes: int = 64 * 1024
    max_arrays: int = 32
    max_ndim: int = 4
    max_dim: int = 1 << 16  # per axis
    max_array_bytes: int = 16 * 1024 * 1024
    max_message_bytes: int = 64 * 1024 * 1024
    max_str_len: int = 4096  # any string in the header (names, reasons, instructions)
    max_depth: int = 8  # nesting of maps/lists in the body
    max_horizon: int = 1024  # actions per chunk

    def to_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.__dict__.items()}


DEFAULT_LIMITS = Limits()


@dataclass
class Message:
    """A decoded message. `arrays` are read-only views of the received frames (zero-copy)."""

    kind: str
    seq: int
    t_mono: float  # sender's monotonic clock (s) when sent
    t_wall: float  # sender's wall clock (unix s) when sent
    body: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    version: int = PROTOCOL_VERSION


# ----------------------------------------------------------------------------------------------- encoding

def _as_wire_array(name: str, a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    for dname, dt in DTYPES.items():
        if a.dtype == dt or (a.dtype.kind == dt.kind and a.dtype.itemsize == dt.itemsize and dname != "bool"):
            if a.dtype != dt:  # big-endian -> little-endian
                a = a.astype(dt)
            return np.ascontiguousarray(a)
    raise ProtocolError("bad_dtype", f"array {name!r} has dtype {a.dtype}; allowed: {', '.join(DTYPES)}")


def _dtype_name(a: np.ndarray) -> str:
    for dname, dt in DTYPES.items():
        if a.dtype == dt:
            return dname
    raise ProtocolError("bad_dtype", f"dtype {a.dtype} not allowed")


def encode(kind: str, seq: int, body: dict[str, Any] | None = None,
           arrays: dict[str, np.ndarray] | None = None, limits: Limits | None = None) -> list[Any]:
    """Frames for one message: [header bytes, array buffers...]. Send with `send_multipart(frames, copy=False)`.

    The array frames are the (contiguous) numpy arrays themselves, so zmq sends them without a copy.
    With `limits`, a message the receiver would reject for its size (array count, header, array or message
    bytes, dims) raises ProtocolError here instead: a sender learns of it at once, and can answer with an
    error the peer can read, rather than the peer silently dropping the message.
    """
    if kind not in KINDS:
        raise ProtocolError("unknown_kind", f"cannot encode kind {kind!r}")
    descs = []
    frames: list[Any] = []
    for name, a in (arrays or {}).items():
        w = _as_wire_array(name, a)
        descs.append([name, _dtype_name(w), list(w.shape), int(w.nbytes)])
        frames.append(w if w.nbytes else b"")
    header = {"v": PROTOCOL_VERSION, "kind": kind, "seq": int(seq), "t_mono": time.monotonic(),
              "t_wall": time.time(), "arrays": descs, "body": body or {}}
    raw = msgpack.packb(header, use_bin_type=True)
    if limits is not None:
        check_size(raw, descs, limits, kind)
    return [raw, *frames]


def check_size(raw_header: bytes, descs: list[list[Any]], limits: Limits, kind: str = "message") -> None:
    """The size checks `decode` applies, on a message about to be sent (ProtocolError too_large / ...)."""
    if len(descs) > limits.max_arrays:
        raise ProtocolError("too_large", f"{kind} has {len(descs)} arrays, more than max_arrays {limits.max_arrays}")
    if len(raw_header) > limits.max_header_bytes:
        raise ProtocolError("header_too_large", f"{kind} header of {len(raw_header)} bytes exceeds "
                                                f"{limits.max_header_bytes}")
    total = len(raw_header)
    for name, _, shape, nbytes in descs:
        if len(shape) > limits.max_ndim or any(d > limits.max_dim for d in shape):
            raise ProtocolError("bad_shape", f"{kind} array {name!r} of shape {shape} exceeds the shape limits")
        if nbytes > limits.max_array_bytes:
            raise ProtocolError("too_large", f"{kind} array {name!r}: {nbytes} bytes exceeds {limits.max_array_bytes}")
        total += nbytes
    if total > limits.max_message_bytes:
        raise ProtocolError("too_large", f"{kind} of {total} bytes exceeds {limits.max_message_bytes}")


# ----------------------------------------------------------------------------------------------- decoding

def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError("bad_header", f"msgpack extension type {code} not allowed")


def _check_tree(x: Any, limits: Limits) -> None:
    """Bound the nesting of the body (iteratively: a hostile depth cannot recurse here).

    Types need no check: with bin and ext disabled and strict map keys, msgpack can only produce None,
    bool, int, float, str, list and dict (with str keys); string lengths are bounded by the unpacker.
    """
    stack: list[tuple[Any, int]] = [(x, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            children: Any = v.values()
        elif isinstance(v, list):
            children = v
        else:
            continue
        if d >= limits.max_depth:
            raise ProtocolError("bad_header", f"body nested deeper than {limits.max_depth}")
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))


def _frame_bytes(f: Any) -> memoryview | bytes:
    """A received frame's payload without copying (zmq.Frame.buffer, or bytes / memoryview)."""
    buf = getattr(f, "buffer", None)
    if buf is not None:
        return buf
    if isinstance(f, (bytes, bytearray, memoryview)):
        return f
    raise ProtocolError("bad_header", f"frame of type {type(f).__name__}")


def _decode_header(raw: memoryview | bytes, limits: Limits) -> dict[str, Any]:
    if len(raw) > limits.max_header_bytes:
        raise ProtocolError("header_too_large", f"header of {len(raw)} bytes exceeds {limits.max_header_bytes}")
    try:
        h = msgpack.unpackb(raw, raw=False, strict_map_key=True, ext_hook=_reject_ext, use_list=True,
                            max_str_len=limits.max_str_len, max_bin_len=0,
                            max_array_len=limits.max_header_bytes, max_map_len=limits.max_header_bytes,
                            max_ext_len=0)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises ValueError/ExtraData/FormatError/StackError/UnicodeDecodeError...
        if "max_str_len" in str(e):
            raise ProtocolError("too_large", f"a header string exceeds {limits.max_str_len} chars") from e
        raise ProtocolError("bad_header", f"header is not valid msgpack: {type(e).__name__}: {str(e)[:80]}") from e
    if not isinstance(h, dict):
        raise ProtocolError("bad_header", f"header must be a map, got {type(h).__name__}")
    return h


def peek_reply_to(frames: Sequence[Any], limits: Limits = DEFAULT_LIMITS) -> int | None:
    """`body.reply_to` of a message that `decode` rejected, if its header alone is readable (else None).

    Lets a client fail the request a rejected reply answered, at once and with the rejection's reason,
    instead of waiting out the request's timeout. Same limits as `decode`; arrays are not touched.
    """
    try:
        if not frames:
            return None
        h = _decode_header(_frame_bytes(frames[0]), limits)
        _check_tree(h, limits)
    except ProtocolError:
        return None
    body = h.get("body")
    r = body.get("reply_to") if isinstance(body, dict) else None
    return r if isinstance(r, int) and not isinstance(r, bool) and r >= 0 else None


def decode(frames: Sequence[Any], limits: Limits = DEFAULT_LIMITS, allowed_kinds: Iterable[str] | None = None
           ) -> Message:
    """Validate and decode one message (frames without any ROUTER identity). Raises ProtocolError."""
    if len(frames) < 1:
        raise ProtocolError("frame_count", "empty message")
    if len(frames) > limits.max_arrays + 1:
        raise ProtocolError("frame_count", f"{len(frames)} frames exceeds {limits.max_arrays + 1}")
    raw = _frame_bytes(frames[0])
    h = _decode_header(raw, limits)
    v = h.get("v")
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError("bad_header", "header field 'v' (protocol version) missing or not an int")
    if v != PROTOCOL_VERSION:
        raise ProtocolError("bad_version", f"protocol version {v} not supported (this side speaks {PROTOCOL_VERSION})")
    kind = h.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise ProtocolError("unknown_kind", f"unknown message kind {str(kind)[:40]!r}")
    if allowed_kinds is not None and kind not in allowed_kinds:
        raise ProtocolError("unknown_kind", f"kind {kind!r} not accepted in this direction")
    seq = h.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 2**63:
        raise ProtocolError("bad_header", "header field 'seq' missing or not a non-negative int")
    stamps = []
    for k in ("t_mono", "t_wall"):
        t = h.get(k)
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t):
            raise ProtocolError("bad_header", f"header field {k!r} missing or not a finite number")
        stamps.append(float(t))
    body = h.get("body", {})
    if not isinstance(body, dict):
        raise ProtocolError("bad_header", "header field 'body' must be a map")
    _check_tree(body, limits)
    descs = h.get("arrays", [])
    if not isinstance(descs, list):
        raise ProtocolError("bad_header", "header field 'arrays' must be a list")
    if len(descs) > limits.max_arrays:
        raise ProtocolError("too_large", f"{len(descs)} arrays exceeds {limits.max_arrays}")
    if len(descs) != len(frames) - 1:
        raise ProtocolError("frame_count", f"header lists {len(descs)} arrays but {len(frames) - 1} array frames came")
    arrays: dict[str, np.ndarray] = {}
    total = len(raw)
    for d, f in zip(descs, frames[1:]):
        name, arr = _decode_array(d, f, limits)
        if name in arrays:
            raise ProtocolError("bad_field", f"duplicate array name {name!r}")
        total += arr.nbytes
        if total > limits.max_message_bytes:
            raise ProtocolError("too_large", f"message exceeds {limits.max_message_bytes} bytes")
        arrays[name] = arr
    return Message(kind=kind, seq=seq, t_mono=stamps[0], t_wall=stamps[1], body=body, arrays=arrays, version=v)


def _decode_array(d: Any, f: Any, limits: Limits) -> tuple[str, np.ndarray]:
    if not isinstance(d, list) or len(d) != 4:
        raise ProtocolError("bad_header", "array descriptor must be [name, dtype, shape, nbytes]")
    name, dname, shape, nbytes = d
    if not isinstance(name, str) or not 0 < len(name) <= 128:
        raise ProtocolError("bad_field", "array name must be a string of 1-128 chars")
    if not isinstance(dname, str) or dname not in DTYPES:
        raise ProtocolError("bad_dtype", f"array {name!r}: dtype {str(dname)[:20]!r} not in {', '.join(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > limits.max_ndim:
        raise ProtocolError("bad_shape", f"array {name!r}: shape must be a list of at most {limits.max_ndim} dims")
    for s in shape:
        if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s <= limits.max_dim:
            raise ProtocolError("bad_shape", f"array {name!r}: invalid dimension {str(s)[:20]}")
    dt = DTYPES[dname]
    n = dt.itemsize * math.prod(shape)
    if n > limits.max_array_bytes:
        raise ProtocolError("too_large", f"array {name!r}: {n} bytes exceeds {limits.max_array_bytes}")
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes != n:
        raise ProtocolError("size_mismatch", f"array {name!r}: nbytes {str(nbytes)[:20]} != dtype x shape = {n}")
    buf = _frame_bytes(f)
    if len(buf) != n:
        raise ProtocolError("size_mismatch", f"array {name!r}: frame has {len(buf)} bytes, descriptor says {n}")
    arr = np.frombuffer(buf, dtype=dt).reshape(shape) if n else np.zeros(shape, dt)
    if dname == "bool" and n and int(np.frombuffer(buf, np.uint8).max()) > 1:
        raise ProtocolError("bad_field", f"array {name!r}: bool bytes must be 0 or 1")
    return name, arr


# ----------------------------------------------------------------------------------------------- helpers

def req_field(body: dict[str, Any], key: str, types: type | tuple[type, ...], kind: str) -> Any:
    """A required body field of the given type(s) (bool is never accepted as a number)."""
    if key not in body:
        raise ProtocolError("bad_field", f"{kind}: missing field {key!r}")
    v = body[key]
    tt = types if isinstance(types, tuple) else (types,)
    if isinstance(v, bool) and bool not in tt:
        raise ProtocolError("bad_field", f"{kind}: field {key!r} must be {'/'.join(t.__name__ for t in tt)}")
    if not isinstance(v, tt):
        raise ProtocolError("bad_field", f"{kind}: field {key!r} must be {'/'.join(t.__name__ for t in tt)}, "
                                         f"got {type(v).__name__}")
    if isinstance(v, float) and not math.isfinite(v):
        raise ProtocolError("bad_field", f"{kind}: field {key!r} must be finite")
    return v


def plain(x: Any, depth: int = 0) -> Any:
    """Best-effort conversion of diagnostics (StepResult.info, summaries) into msgpack-safe plain data.

    numpy scalars become Python numbers, small arrays lists; anything else its repr (truncated), so a
    diagnostic value can never break a reply.
    """
    if depth > 6:
        return repr(x)[:200]
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else repr(x)
    if isinstance(x, np.generic):
        return plain(x.item(), depth + 1)
    if isinstance(x, np.ndarray):
        return plain(x.tolist(), depth + 1) if x.size <= 256 else f"<array {x.dtype} {list(x.shape)}>"
    if isinstance(x, (list, tuple)):
        return [plain(v, depth + 1) for v in x[:256]]
    if isinstance(x, dict):
        return {str(k): plain(v, depth + 1) for k, v in list(x.items())[:256]}
    return repr(x)[:200]


# ------------------------------------------------------------------- observations <-> (body, arrays)

IMAGE_PREFIX = "image/"
PRIV_PREFIX = "priv/"


class PrivPacker:
    """Collects the privileged state's numpy arrays into one flat array per dtype ("priv/<dtype>").

    Why: a simulator's privileged state holds many small arrays (LIBERO-Object: ~50 poses and boxes). One
    frame each would exceed `max_arrays` (and cost a zmq frame per 3 floats); packed, an observation has at
    most one privileged frame per dtype however many objects the scene holds. The copy is small (poses), and
    the receiver gets read-only zero-copy views into the received frame.
    """

    def __init__(self) -> None:
        self._parts: dict[str, list[np.ndarray]] = {}
        self._sizes: dict[str, int] = {}

    def add(self, a: np.ndarray) -> dict[str, Any]:
        w = _as_wire_array("privileged", a)
        dname = _dtype_name(w)
        off = self._sizes.get(dname, 0)
        self._parts.setdefault(dname, []).append(w.reshape(-1))
        self._sizes[dname] = off + w.size
        return {"$view": f"{PRIV_PREFIX}{dname}", "offset": off, "shape": list(w.shape)}

    def arrays(self) -> dict[str, np.ndarray]:
        return {f"{PRIV_PREFIX}{d}": np.concatenate(parts) for d, parts in self._parts.items()}  # each (n_d,)


def pack_tree(x: Any, arrays: dict[str, np.ndarray], depth: int = 0, packer: PrivPacker | None = None) -> Any:
    """Privileged simulator state -> plain body tree; numpy arrays become {'$view': ...} slices of the packed
    "priv/<dtype>" arrays, which are added to `arrays`.

    Exact: float64 arrays and Python floats round-trip bit for bit (needed for lockstep == in-process).
    """
    if packer is None:
        packer = PrivPacker()
        tree = pack_tree(x, arrays, depth, packer)
        arrays.update(packer.arrays())
        return tree
    if depth > 6:
        raise ProtocolError("bad_field", "privileged state nested too deeply")
    if isinstance(x, np.ndarray) and x.dtype.kind in "US":  # text arrays (object names) travel as lists
        return {"$str_array": [str(v) for v in x.reshape(-1).tolist()], "shape": list(x.shape)}
    if isinstance(x, np.ndarray):
        return packer.add(x)
    if isinstance(x, np.generic):
        return x.item()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, (list, tuple)):
        return [pack_tree(v, arrays, depth + 1, packer) for v in x]
    if isinstance(x, dict):
        return {str(k): pack_tree(v, arrays, depth + 1, packer) for k, v in x.items()}
    raise ProtocolError("bad_field", f"privileged value of type {type(x).__name__} cannot be sent")


def _view(x: dict[str, Any], arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Resolve {"$view": "priv/<dtype>", "offset": k, "shape": [...]}: a read-only view, bounds-checked."""
    ref, off, shape = x["$view"], x["offset"], x["shape"]
    if not isinstance(ref, str) or ref not in arrays or not ref.startswith(PRIV_PREFIX):
        raise ProtocolError("bad_field", f"privileged array reference {str(ref)[:40]!r} not in the message")
    flat = arrays[ref]
    if flat.ndim != 1:
        raise ProtocolError("bad_shape", f"packed privileged array {ref!r} must be 1-D")
    if not isinstance(off, int) or isinstance(off, bool) or off < 0:
        raise ProtocolError("bad_field", "privileged view offset must be an int >= 0")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ProtocolError("bad_field", "privileged view shape must be a list of at most 8 ints >= 0")
    n = math.prod(shape)
    if off + n > flat.shape[0]:
        raise ProtocolError("bad_field", f"privileged view [{off}, {off + n}) outside {ref!r} of {flat.shape[0]}")
    return flat[off:off + n].reshape(shape)


def unpack_tree(x: Any, arrays: dict[str, np.ndarray], depth: int = 0) -> Any:
    if depth > 8:
        raise ProtocolError("bad_field", "privileged state nested too deeply")
    if isinstance(x, dict):
        if set(x) == {"$view", "offset", "shape"}:
            return _view(x, arrays)
        if set(x) == {"$array"}:  # a whole array frame (simple senders may use it for a few arrays)
            ref = x["$array"]
            if not isinstance(ref, str) or ref not in arrays or not ref.startswith(PRIV_PREFIX):
                raise ProtocolError("bad_field", f"privileged array reference {str(ref)[:40]!r} not in the message")
            return arrays[ref]
        if set(x) == {"$str_array", "shape"}:
            vals, shape = x["$str_array"], x["shape"]
            if (not isinstance(vals, list) or not all(isinstance(v, str) for v in vals)
                    or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                    or int(np.prod(shape)) != len(vals)):
                raise ProtocolError("bad_field", "malformed privileged text array")
            return np.array(vals, dtype=str).reshape(shape)
        return {k: unpack_tree(v, arrays, depth + 1) for k, v in x.items()}
    if isinstance(x, list):
        return [unpack_tree(v, arrays, depth + 1) for v in x]
    return x


def obs_to_wire(images: dict[str, np.ndarray], state: np.ndarray, instruction: str, stamp: float, tick: int,
                privileged: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The 'obs' body + arrays: image/<camera> uint8 (H, W, 3), state float32 (S,), priv/<dtype> (n,) packed."""
    arrays: dict[str, np.ndarray] = {f"{IMAGE_PREFIX}{cam}": np.asarray(img) for cam, img in images.items()}
    arrays["state"] = np.asarray(state, dtype=np.float32)
    priv = pack_tree(privileged, arrays)
    return {"tick": int(tick), "stamp": float(stamp), "instruction": str(instruction), "privileged": priv}, arrays


@dataclass
class WireObs:
    """An observation as received, in the agent's clock (`stamp`) and tick numbering."""

    images: dict[str, np.ndarray]
    state: np.ndarray  # float32 (S,)
    instruction: str
    stamp: float
    tick: int
    privileged: dict[str, Any]


def obs_from_wire(body: dict[str, Any], arrays: dict[str, np.ndarray], kind: str = "obs",
                  image_size: int | None = None, state_dim: int | None = None) -> WireObs:
    o = req_field(body, "obs", dict, kind) if kind == "step" else body
    tick = req_field(o, "tick", int, kind)
    stamp = float(req_field(o, "stamp", (int, float), kind))
    instruction = req_field(o, "instruction", str, kind)
    priv_body = o.get("privileged", {})
    if not isinstance(priv_body, dict):
        raise ProtocolError("bad_field", f"{kind}: privileged must be a map")
    images = {}
    for name, a in arrays.items():
        if name.startswith(IMAGE_PREFIX):
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
                raise ProtocolError("bad_shape", f"{kind}: image {name!r} must be uint8 (H, W, 3), got {a.dtype} {a.shape}")
            if image_size is not None and a.shape[:2] != (image_size, image_size):
                raise ProtocolError("bad_shape", f"{kind}: image {name!r} is {a.shape[:2]}, spec says {image_size}")
            images[name[len(IMAGE_PREFIX):]] = a
        elif name != "state" and not name.startswith(PRIV_PREFIX):
            raise ProtocolError("bad_field", f"{kind}: unexpected array {name!r}")
    state = arrays.get("state")
    if state is None or state.dtype != np.float32 or state.ndim != 1:
        raise ProtocolError("bad_shape", f"{kind}: 'state' must be a float32 vector")
    if state_dim is not None and state.shape[0] != state_dim:
        raise ProtocolError("bad_shape", f"{kind}: state has {state.shape[0]} dims, spec says {state_dim}")
    priv = unpack_tree(priv_body, arrays)
    return WireObs(images=images, state=state, instruction=instruction, stamp=stamp, tick=tick, privileged=priv)


# ----------------------------------------------------------------------------------------------- robot spec

@dataclass(frozen=True)
class RobotSpec(EnvSpec):
    """What the robot offers, sent in the handshake (`spec` message body field 'robot').

    The env spec (vla_runtime.envs.EnvSpec: name, action dim and limits, cameras, image size, state dim, control
    rate) plus the hold action and the task list, so a client can build an Env adapter (RemoteEnv) without
    knowing anything else about the robot.
    """

    hold_action: tuple[float, ...] = ()
    tasks: tuple[tuple[str, str, int, int], ...] = ()  # (task id, instruction, max steps, fixed init states)

    def __post_init__(self) -> None:
        if self.action_dim < 1 or len(self.action_low) != self.action_dim or len(self.action_high) != self.action_dim \
                or len(self.hold_action) != self.action_dim:
            raise ProtocolError("bad_field", "robot spec: action_low/high/hold must have action_dim entries")
        if not (math.isfinite(self.control_hz) and self.control_hz > 0):
            raise ProtocolError("bad_field", "robot spec: control_hz must be > 0")
        if not all(math.isfinite(x) for x in (*self.action_low, *self.action_high, *self.hold_action)):
            raise ProtocolError("bad_field", "robot spec: limits must be finite")

    def env_spec(self, name: str) -> EnvSpec:
        """The plain env spec a client adapter exposes (renamed, e.g. remote:tcp://...)."""
        return replace(EnvSpec(**{f.name: getattr(self, f.name) for f in fields(EnvSpec)}), name=name)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "action_dim": self.action_dim, "action_low": list(self.action_low),
                "action_high": list(self.action_high), "cameras": list(self.cameras),
                "image_size": self.image_size, "state_dim": self.state_dim, "control_hz": self.control_hz,
                "hold_action": list(self.hold_action),
                "tasks": [{"task": t, "instruction": i, "max_steps": m, "init_states": n} for t, i, m, n in self.tasks]}

    @staticmethod
    def from_dict(d: Any) -> "RobotSpec":
        if not isinstance(d, dict):
            raise ProtocolError("bad_field", "spec: 'robot' must be a map")
        k = "spec.robot"

        def floats(key: str) -> tuple[float, ...]:
            v = req_field(d, key, list, k)
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
                raise ProtocolError("bad_field", f"{k}: {key} must be a list of numbers")
            return tuple(float(x) for x in v)

        cams = req_field(d, "cameras", list, k)
        if not all(isinstance(c, str) for c in cams):
            raise ProtocolError("bad_field", f"{k}: cameras must be strings")
        tasks = []
        for t in req_field(d, "tasks", list, k):
            if not isinstance(t, dict):
                raise ProtocolError("bad_field", f"{k}: tasks must be maps")
            n = t.get("init_states", 0)  # optional (added in protocol 2): 0 = no fixed init states
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ProtocolError("bad_field", f"{k}: init_states must be an integer >= 0")
            tasks.append((req_field(t, "task", str, k), req_field(t, "instruction", str, k),
                          req_field(t, "max_steps", int, k), n))
        return RobotSpec(name=req_field(d, "name", str, k), action_dim=req_field(d, "action_dim", int, k),
                         action_low=floats("action_low"), action_high=floats("action_high"),
                         cameras=tuple(cams), image_size=req_field(d, "image_size", int, k),
                         state_dim=req_field(d, "state_dim", int, k),
                         control_hz=float(req_field(d, "control_hz", (int, float), k)),
                         hold_action=floats("hold_action"), tasks=tuple(tasks))
