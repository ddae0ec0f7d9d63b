"""Wire format: round trips are exact and zero-copy, every malformed input is a ProtocolError with a code."""

from __future__ import annotations

import subprocess
import sys

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vla_runtime.bridges import protocol as P
from vla_runtime.bridges.protocol import Limits, ProtocolError
from vla_runtime.bridges.safety import SafetyConfig, SafetyFilter
from vla_runtime.bridges.testing import desc, header, pack


def _bytes(frames: list) -> list[bytes]:
    return [bytes(memoryview(f).cast("B")) if not isinstance(f, bytes) else f for f in frames]


def test_round_trip_exact_for_every_whitelisted_dtype() -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "u8": rng.integers(0, 255, (4, 5, 3), dtype=np.uint8),
        "f32": rng.standard_normal((3, 7)).astype(np.float32),
        "f64": rng.standard_normal(5),
        "i32": rng.integers(-9, 9, 6).astype(np.int32),
        "i64": rng.integers(-2**40, 2**40, 2),
        "b": np.array([True, False, True]),
        "empty": np.zeros((0, 7), np.float32),
    }
    frames = _bytes(P.encode("obs", 12, {"tick": 3, "nested": {"a": [1, 2.5, "x"]}}, arrays))
    m = P.decode(frames)
    assert (m.kind, m.seq, m.body["tick"], m.body["nested"]) == ("obs", 12, 3, {"a": [1, 2.5, "x"]})
    assert set(m.arrays) == set(arrays)
    for k, a in arrays.items():
        assert m.arrays[k].dtype == a.dtype and m.arrays[k].shape == a.shape
        assert np.array_equal(m.arrays[k], a)
    assert not m.arrays["u8"].flags.writeable  # a view of the received frame, not a copy


def test_big_endian_is_converted_and_unsupported_dtypes_refused() -> None:
    m = P.decode(_bytes(P.encode("obs", 1, {}, {"x": np.arange(3, dtype=">f4")})))
    assert m.arrays["x"].dtype == np.dtype("<f4") and m.arrays["x"].tolist() == [0, 1, 2]
    for bad in (np.zeros(2, np.float16), np.array(["a"]), np.array([object()]), np.zeros(2, np.complex64)):
        with pytest.raises(ProtocolError) as e:
            P.encode("obs", 1, {}, {"x": bad})
        assert e.value.code == "bad_dtype"


def test_observation_with_privileged_state_round_trips_bit_exact() -> None:
    rng = np.random.default_rng(1)
    priv = {"task": "reach", "target_pos": rng.standard_normal(3), "objs": {"bowl": rng.standard_normal(7)},
            "k": np.float64(0.1), "ids": [np.int64(3), 4]}
    imgs = {"agentview": rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)}
    state = rng.standard_normal(8).astype(np.float32)
    body, arrays = P.obs_to_wire(imgs, state, "do it", 12.5, 4, priv)
    m = P.decode(_bytes(P.encode("obs", 1, body, arrays)))
    w = P.obs_from_wire(m.body, m.arrays, state_dim=8, image_size=8)
    assert w.tick == 4 and w.stamp == 12.5 and w.instruction == "do it"
    assert np.array_equal(w.images["agentview"], imgs["agentview"]) and np.array_equal(w.state, state)
    assert w.privileged["task"] == "reach" and w.privileged["k"] == 0.1 and w.privileged["ids"] == [3, 4]
    assert w.privileged["target_pos"].tobytes() == priv["target_pos"].tobytes()
    assert w.privileged["objs"]["bowl"].tobytes() == priv["objs"]["bowl"].tobytes()
    with pytest.raises(ProtocolError) as e:
        P.obs_from_wire(m.body, m.arrays, state_dim=9)
    assert e.value.code == "bad_shape"


def test_dangling_array_reference_is_rejected() -> None:
    with pytest.raises(ProtocolError) as e:
        P.unpack_tree({"x": {"$array": "priv/9"}}, {})
    assert e.value.code == "bad_field"


LIM = Limits(max_header_bytes=1024, max_arrays=4, max_ndim=3, max_dim=1000, max_array_bytes=4096,
             max_message_bytes=6000, max_str_len=64, max_depth=4)


@pytest.mark.parametrize("frames, code", [
    ([], "frame_count"),
    ([b"\xc1"], "bad_header"),
    ([pack([1, 2])], "bad_header"),
    ([pack({"kind": "obs"})], "bad_header"),
    ([pack(header("obs", 1, v=P.PROTOCOL_VERSION + 1))], "bad_version"),
    ([pack(header("obs", 1, v=1))], "bad_version"),
    ([pack(header("pickle", 1))], "unknown_kind"),
    ([pack(header("obs", -1))], "bad_header"),
    ([pack(header("obs", 1, body={"s": "x" * 65}))], "too_large"),
    ([pack(header("obs", 1, body={"a": [[[[[[1]]]]]]}))], "bad_header"),
    ([pack(header("obs", 1, body={"a": b"raw bytes"}))], "bad_header"),
    ([pack(header("obs", 1, body={"a": msgpack.ExtType(1, b"x")}))], "bad_header"),
    ([pack(header("obs", 1, body={"pad": "x" * 60, "p2": ["y" * 60] * 20}))], "header_too_large"),
    ([pack(header("obs", 1, descs=[["x", "float16", [2], 4]])), b"\0" * 4], "bad_dtype"),
    ([pack(header("obs", 1, descs=[["x", "float32", [-2], 8]])), b"\0" * 8], "bad_shape"),
    ([pack(header("obs", 1, descs=[["x", "float32", [1, 1, 1, 1], 4]])), b"\0" * 4], "bad_shape"),
    ([pack(header("obs", 1, descs=[["x", "float32", [2000], 8000]])), b"\0" * 8000], "bad_shape"),
    ([pack(header("obs", 1, descs=[["x", "float32", [900, 2], 7200]])), b"\0" * 7200], "too_large"),
    ([pack(header("obs", 1, descs=[["x", "float32", [2], 9]])), b"\0" * 8], "size_mismatch"),
    ([pack(header("obs", 1, descs=[["x", "float32", [2], 8]])), b"\0" * 7], "size_mismatch"),
    ([pack(header("obs", 1, descs=[["x", "float32", [2], 8]]))], "frame_count"),
    ([pack(header("obs", 1)), b"\0"], "frame_count"),
    ([pack(header("obs", 1, descs=[["x", "bool", [2], 2]])), b"\0\x07"], "bad_field"),
    ([pack(header("obs", 1, descs=[["x", "uint8", [1], 1], ["x", "uint8", [1], 1]])), b"\0", b"\0"], "bad_field"),
    ([pack(header("obs", 1, descs=[[f"a{i}", "uint8", [800], 800] for i in range(4)] + [])), *[b"\0" * 800] * 4],
     None),
    ([pack(header("obs", 1, descs=[[f"a{i}", "uint8", [1000, 2], 2000] for i in range(3)])), *[b"\0" * 2000] * 3],
     "too_large"),
])
def test_malformed_frames_raise_coded_errors(frames: list[bytes], code: str | None) -> None:
    if code is None:  # control: a message just inside every limit decodes
        assert len(P.decode(frames, LIM).arrays) == 4
        return
    with pytest.raises(ProtocolError) as e:
        P.decode(frames, LIM)
    assert e.value.code == code, e.value.reason


def test_direction_whitelist() -> None:
    frames = _bytes(P.encode("spec", 1, {}))
    with pytest.raises(ProtocolError) as e:
        P.decode(frames, allowed_kinds=P.CLIENT_KINDS)
    assert e.value.code == "unknown_kind"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=5))
def test_random_bytes_only_ever_raise_protocol_error(frames: list[bytes]) -> None:
    try:
        P.decode(frames, LIM)
    except ProtocolError as e:
        assert e.code in P.ERROR_CODES


json_like = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats() | st.text(max_size=20),
                         lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                         max_leaves=12)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["v", "kind", "seq", "t_mono", "t_wall", "arrays", "body", "x"]), json_like),
       st.lists(st.binary(max_size=64), max_size=3))
def test_random_headers_only_ever_raise_protocol_error(h: dict, data: list[bytes]) -> None:
    try:
        m = P.decode([pack(h), *data], LIM)
    except ProtocolError as e:
        assert e.code in P.ERROR_CODES
    else:  # anything accepted really is well formed
        assert m.kind in P.KINDS and m.version == P.PROTOCOL_VERSION and len(m.arrays) == len(data)


def test_safety_filter_clamps_rate_limits_and_counts() -> None:
    f = SafetyFilter(np.full(3, -1, np.float32), np.full(3, 1, np.float32), np.zeros(3, np.float32),
                     SafetyConfig(max_delta_frac=0.25))  # max change 0.5 per tick; last dim (gripper) exempt
    out = f.filter(np.array([5.0, 0.2, 1.0], np.float32))
    assert out.tolist() == np.float32([0.5, 0.2, 1.0]).tolist()  # clamped to 1, then rate limited from hold (0) to 0.5; gripper free
    assert f.counts["clamped"] == 1 and f.counts["rate_limited"] == 1
    out = f.filter(np.array([1.0, 0.2, -1.0], np.float32))
    assert out.tolist() == np.float32([1.0, 0.2, -1.0]).tolist()
    assert f.held().tolist() == [0, 0, 0]
    assert f.filter(np.array([1.0, 0.0, 0.0], np.float32)).tolist() == [0.5, 0.0, 0.0]  # from hold again
    assert f.summary()["rate_limited"] == 2


def test_robot_side_imports_no_model_code() -> None:
    code = ("import sys, vla_runtime.bridges.agent, vla_runtime.bridges.protocol, vla_runtime.bridges.safety, "
            "vla_runtime.bridges.keys, vla_runtime.bridges.client; "
            "bad = [m for m in ('torch', 'transformers', 'robosuite', 'mujoco', 'triton', 'pickle_compat') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.none(), st.lists(st.floats(-10, 10, width=32), min_size=4, max_size=4)),
                min_size=1, max_size=30),
       st.floats(0.05, 1.0))
def test_safety_filter_invariants(seq: list[list[float] | None], frac: float) -> None:
    """Whatever is commanded: outputs stay within limits, and rate-limited dims move at most frac x range per
    tick from the previous output. A hold is immediate (zero delta = stop), never rate limited."""
    low = np.array([-1, -2, 0, -1], np.float32)
    high = np.array([1, 2, 1, 1], np.float32)
    f = SafetyFilter(low, high, np.zeros(4, np.float32), SafetyConfig(max_delta_frac=frac))
    prev = np.zeros(4, np.float32)
    step = (high - low) * np.float32(frac)
    for cmd in seq:
        if cmd is None:
            prev = f.held()
            assert not prev.any()
            continue
        out = f.filter(np.array(cmd, np.float32))
        assert np.all(out >= low) and np.all(out <= high)
        assert np.all(np.abs(out[:3] - prev[:3]) <= step[:3] + 1e-6)  # gripper (last dim) exempt
        prev = out


def test_privileged_text_arrays_round_trip():
    import numpy as np

    from vla_runtime.bridges.protocol import ProtocolError, pack_tree, unpack_tree

    arrays: dict = {}
    tree = pack_tree({"objects": np.array([["soup", "basket"]]), "pos": np.ones(3)}, arrays)
    back = unpack_tree(tree, arrays)
    assert back["objects"].shape == (1, 2) and back["objects"][0, 1] == "basket"
    assert set(arrays) == {"priv/float64"} and arrays["priv/float64"].dtype == np.float64  # text: no raw frame
    import pytest

    with pytest.raises(ProtocolError):
        unpack_tree({"$str_array": ["a", 3], "shape": [2]}, {})


def _scene_privileged(n_objects: int, rng: np.random.Generator) -> dict:
    """A LIBERO-like privileged dict: 6 arrays per object plus robot and collision arrays (int64 included)."""
    p: dict = {"task": "libero_object/0", "objects": np.array([f"obj_{i}" for i in range(n_objects)]),
               "eef_pos": rng.standard_normal(3), "collision_boxes": rng.standard_normal((4 * n_objects, 15)),
               "collision_owner": rng.integers(0, n_objects, 4 * n_objects), "flags": np.array([True, False])}
    for i in range(n_objects):
        for k, shape in (("pos", (3,)), ("quat", (4,)), ("aabb", (2, 3)), ("obb_rot", (3, 3)), ("obb_center", (3,)),
                         ("obb_half", (3,))):
            p[f"obj_{i}_{k}"] = rng.standard_normal(shape)
    p[f"obj_0_pos"] = p["obj_0_pos"].astype(">f8")  # big-endian input is converted, values kept
    p["empty"] = np.zeros((0, 3))
    return p


def test_a_scene_with_many_objects_fits_in_one_frame_per_dtype() -> None:
    """Regression: v1 sent one frame per privileged array, so a LIBERO observation (~50 arrays) exceeded
    max_arrays and the client dropped the reset reply (the 300 s hang). Packed, it decodes under the defaults."""
    rng = np.random.default_rng(3)
    priv = _scene_privileged(12, rng)  # 12 * 6 + 5 arrays: far more than max_arrays = 32
    imgs = {c: rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for c in ("agentview", "wrist")}
    body, arrays = P.obs_to_wire(imgs, np.zeros(8, np.float32), "x", 1.0, 0, priv)
    assert set(arrays) == {"image/agentview", "image/wrist", "state", "priv/float64", "priv/int64", "priv/bool"}
    frames = _bytes(P.encode("obs", 1, body, arrays, P.DEFAULT_LIMITS))
    w = P.obs_from_wire(*(lambda m: (m.body, m.arrays))(P.decode(frames)))
    assert set(w.privileged) == set(priv)
    for k, v in priv.items():
        got = w.privileged[k]
        if isinstance(v, np.ndarray) and v.dtype.kind not in "US":
            assert got.shape == v.shape and got.dtype == v.dtype.newbyteorder("<")
            assert got.tobytes() == v.astype(v.dtype.newbyteorder("<")).tobytes()  # bit-exact
            assert not got.flags.writeable  # a view of the received frame
        elif isinstance(v, np.ndarray):
            assert got.tolist() == v.tolist()
        else:
            assert got == v


@pytest.mark.parametrize("ref", [
    {"$view": "priv/float64", "offset": 2, "shape": [2]},  # past the end
    {"$view": "priv/float64", "offset": -1, "shape": [1]},
    {"$view": "priv/float64", "offset": 0, "shape": [-1]},
    {"$view": "priv/float64", "offset": True, "shape": [1]},
    {"$view": "priv/float64", "offset": 0, "shape": "3"},
    {"$view": "state", "offset": 0, "shape": [1]},  # only priv/ arrays may be referenced
    {"$view": "priv/int64", "offset": 0, "shape": [1]},  # not in the message
])
def test_bad_privileged_views_are_rejected(ref: dict) -> None:
    arrays = {"priv/float64": np.zeros(3), "state": np.zeros(8, np.float32)}
    with pytest.raises(ProtocolError) as e:
        P.unpack_tree({"x": ref}, arrays)
    assert e.value.code == "bad_field"


def test_encode_with_limits_refuses_what_the_receiver_would_drop() -> None:
    arrays = {f"a{i}": np.zeros(1, np.uint8) for i in range(LIM.max_arrays + 1)}
    with pytest.raises(ProtocolError) as e:
        P.encode("obs", 1, {}, arrays, LIM)
    assert e.value.code == "too_large"
    with pytest.raises(ProtocolError) as e:
        P.encode("obs", 1, {}, {"x": np.zeros(LIM.max_array_bytes + 1, np.uint8)}, LIM)
    assert e.value.code in ("too_large", "bad_shape")
    with pytest.raises(ProtocolError) as e:
        P.encode("obs", 1, {"pad": "x" * 60, "p2": ["y" * 60] * 20}, None, LIM)
    assert e.value.code == "header_too_large"
    ok = P.encode("obs", 1, {}, {f"a{i}": np.zeros(1, np.uint8) for i in range(LIM.max_arrays)}, LIM)
    assert len(P.decode(_bytes(ok), LIM).arrays) == LIM.max_arrays  # the same limit on both sides


def test_peek_reply_to_reads_the_header_of_a_rejected_message() -> None:
    too_many = _bytes(P.encode("obs", 5, {"reply_to": 9}, {f"a{i}": np.zeros(1, np.uint8) for i in range(5)}))
    with pytest.raises(ProtocolError):
        P.decode(too_many, LIM)
    assert P.peek_reply_to(too_many, LIM) == 9
    assert P.peek_reply_to(_bytes(P.encode("obs", 5, {})), LIM) is None
    assert P.peek_reply_to([b"\xc1"], LIM) is None
    assert P.peek_reply_to([pack(header("obs", 1, body={"reply_to": True}))], LIM) is None
