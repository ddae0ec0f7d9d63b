"""Rendering setup: GL backend choice and fallback, fast-render settings, and the triton/GL import guard."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

if importlib.util.find_spec("mujoco") is None:  # not importorskip: importing mujoco now would bind its GL
    pytest.skip("mujoco not installed", allow_module_level=True)

from vla_runtime.envs import render  # noqa: E402
from vla_runtime.errors import AssetError  # noqa: E402


@pytest.fixture
def fresh_gl_state(monkeypatch: pytest.MonkeyPatch):
    """Pretend nothing GL-related happened yet in this process; restores env vars afterwards."""
    monkeypatch.setattr(render, "_user_chose_gl", None)
    monkeypatch.setattr(render, "_gl_checked", None)
    monkeypatch.setattr(render, "_gl_platform_bound", lambda: False)
    monkeypatch.setattr(render, "_mujoco_bound_backend", lambda: None)
    monkeypatch.delenv("MUJOCO_GL", raising=False)
    monkeypatch.delenv("PYOPENGL_PLATFORM", raising=False)
    return monkeypatch


def test_setup_gl_defaults_to_egl_and_respects_user_choice(fresh_gl_state: pytest.MonkeyPatch) -> None:
    assert render.setup_gl() == "egl"
    assert os.environ["PYOPENGL_PLATFORM"] == "egl"
    fresh_gl_state.setattr(render, "_user_chose_gl", None)
    fresh_gl_state.setenv("MUJOCO_GL", "osmesa")
    fresh_gl_state.setenv("PYOPENGL_PLATFORM", "osmesa")
    assert render.setup_gl() == "osmesa"
    assert render._user_chose_gl is True
    with pytest.raises(AssetError, match="unknown GL backend"):
        render.setup_gl("vulkan")


def test_check_gl_falls_back_to_osmesa_when_egl_fails(fresh_gl_state: pytest.MonkeyPatch) -> None:
    tried = []

    def probe(backend: str, timeout: float = 0) -> tuple[bool, str]:
        tried.append(backend)
        return backend == "osmesa", f"{backend} broken"

    fresh_gl_state.setattr(render, "_probe_subprocess", probe)
    fresh_gl_state.setattr(render, "_probe_in_process", lambda backend: None)
    fresh_gl_state.setattr(render, "prepare_robosuite_import", lambda: None)
    assert render.check_gl() == "osmesa"
    assert tried == ["egl", "osmesa"]
    assert os.environ["MUJOCO_GL"] == "osmesa" and os.environ["PYOPENGL_PLATFORM"] == "osmesa"


def test_check_gl_names_debian_packages_when_nothing_works(fresh_gl_state: pytest.MonkeyPatch) -> None:
    fresh_gl_state.setattr(render, "_probe_subprocess", lambda b, timeout=0: (False, f"{b} missing"))
    with pytest.raises(AssetError) as e:
        render.check_gl()
    msg = str(e.value)
    for pkg in ("libegl1", "libgl1", "libegl-mesa0", "libosmesa6"):
        assert pkg in msg


def test_check_gl_renders_for_real() -> None:
    assert render.check_gl() in render.GL_BACKENDS


def test_apply_fast_render_model_and_context() -> None:
    import mujoco

    gl_context = importlib.import_module("mujoco." + render.check_gl()).GLContext
    xml = ('<mujoco><worldbody><light pos="0 0 3" castshadow="true"/><camera name="c" pos="0 -1 0.3" '
           'xyaxes="1 0 0 0 0.3 1"/><geom type="plane" size="1 1 .1"/><geom type="sphere" pos="0 0 .1" '
           'size=".1" rgba="1 0 0 1"/></worldbody></mujoco>')
    m = mujoco.MjModel.from_xml_string(xml)
    assert m.vis.quality.offsamples > 0 and m.light_castshadow[0] == 1
    render.apply_fast_render(m)
    assert m.vis.quality.offsamples == 0 and m.light_castshadow[0] == 0

    # a robosuite-like render context: con built before the model change must be rebuilt
    class Ctx:
        def __init__(self, model: mujoco.MjModel) -> None:
            self.model = model
            self.gl_ctx = gl_context(32, 32)
            self.gl_ctx.make_current()
            self.scn = mujoco.MjvScene(model, maxgeom=10)
            self._set_mujoco_context_and_buffers()

        def _set_mujoco_context_and_buffers(self) -> None:
            self.con = mujoco.MjrContext(self.model, mujoco.mjtFontScale.mjFONTSCALE_100)

    m2 = mujoco.MjModel.from_xml_string(xml)
    ctx = Ctx(m2)
    assert ctx.con.offSamples > 0
    render.apply_fast_render(m2)
    render.apply_fast_render_context(ctx)
    assert ctx.con.offSamples == 0
    assert ctx.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] == 0
    assert ctx.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] == 0
    ctx.con.free()
    ctx.gl_ctx.free()


def test_import_triton_after_rendering_robosuite_env_does_not_crash() -> None:
    """`import triton` after the GL driver loaded used to segfault (rc 139); the env's import guard prevents it."""
    pytest.importorskip("triton")
    pytest.importorskip("robosuite")
    code = textwrap.dedent("""
        import numpy as np
        from vla_runtime.envs import make_env
        from vla_runtime.envs.base import EpisodeSpec
        env = make_env("robosuite:Lift", render=True, image_size=32)
        obs = env.reset(EpisodeSpec("robosuite:Lift", "Lift", 0, 3))
        for _ in range(3):
            r = env.step(np.zeros(7, np.float32))
        assert r.obs.images["agentview"].shape == (32, 32, 3)
        import triton
        print("TRITON_OK", triton.__version__)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, f"rc {r.returncode}: {r.stderr[-2000:]}"
    assert "TRITON_OK" in r.stdout
    assert "private macro file" not in r.stderr  # robosuite's import nag is filtered, nothing else
