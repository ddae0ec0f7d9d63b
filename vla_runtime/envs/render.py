"""Offscreen rendering setup for MuJoCo-based envs (robosuite, LIBERO), and the triton/GL import-order guard.

Why this module exists:
- The GL backend is chosen once per process, when `mujoco` (and PyOpenGL) are first imported, so
  `MUJOCO_GL` / `PYOPENGL_PLATFORM` must be set before any simulator import: `setup_gl()`.
- A headless machine may lack EGL; `check_gl()` tries a real tiny offscreen render and falls back to OSMesa
  when the user did not choose a backend, or raises `AssetError` naming the Debian packages to install.
- `import triton` after Mesa's GL driver is loaded kills the process with SIGSEGV (rc 139). Measured here:
  `MUJOCO_GL=egl python -c "import mujoco; import triton"` segfaults, while `import triton; import mujoco`
  works and both EGL and OSMesa still render. The cause is not numba (plain numba jit + triton is fine): Mesa's
  llvmpipe driver maps the system `libLLVM-15.so`, whose symbols clash with the LLVM statically linked into
  `triton/_C/libtriton.so`. `prepare_robosuite_import()` therefore imports triton first (when installed).
- Offscreen MSAA, shadows and reflections cost most of the software-rendered frame time and add nothing a
  128 px policy can use: `apply_fast_render*()` turns them off.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from typing import Any

from vla_runtime.errors import AssetError

log = logging.getLogger(__name__)

GL_BACKENDS = ("egl", "osmesa")
DEBIAN_PACKAGES = {"egl": "libegl1 libgl1 libegl-mesa0", "osmesa": "libosmesa6"}

_user_chose_gl: bool | None = None  # None until setup_gl() ran
_gl_checked: str | None = None  # backend that passed check_gl() in this process

# A minimal scene: one light, one red sphere. Rendering it exercises context creation, the scene and readback.
_PROBE_XML = ('<mujoco><worldbody><light pos="0 0 3"/><camera name="c" pos="0 -1 0.3" xyaxes="1 0 0 0 0.3 1"/>'
              '<geom type="sphere" size=".1" rgba="1 0 0 1"/></worldbody></mujoco>')

# `mujoco.<backend>.GLContext`, not `mujoco.GLContext`: the latter is bound at `import mujoco` time (glfw when
# MUJOCO_GL was unset then), while robosuite uses its own EGL/OSMesa context classes either way.
_PROBE_SRC = """
import importlib, mujoco, numpy as np
m = mujoco.MjModel.from_xml_string(PROBE_XML)
d = mujoco.MjData(m)
mujoco.mj_forward(m, d)
ctx = importlib.import_module("mujoco." + BACKEND).GLContext(16, 16)
ctx.make_current()
con = mujoco.MjrContext(m, mujoco.mjtFontScale.mjFONTSCALE_100)
mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, con)
scn = mujoco.MjvScene(m, maxgeom=10)
cam = mujoco.MjvCamera(); cam.type = mujoco.mjtCamera.mjCAMERA_FIXED; cam.fixedcamid = 0
mujoco.mjv_updateScene(m, d, mujoco.MjvOption(), mujoco.MjvPerturb(), cam, mujoco.mjtCatBit.mjCAT_ALL, scn)
vp = mujoco.MjrRect(0, 0, 16, 16)
mujoco.mjr_render(vp, scn, con)
img = np.empty((16, 16, 3), np.uint8)
mujoco.mjr_readPixels(img, None, vp, con)
con.free(); ctx.free()
assert img.max() > 0, "rendered an all-black image"
print("GL_PROBE_OK")
"""


def _probe_src(backend: str) -> str:
    return f"PROBE_XML = {_PROBE_XML!r}\nBACKEND = {backend!r}\n" + _PROBE_SRC


def setup_gl(backend: str | None = None) -> str:
    """Set MUJOCO_GL / PYOPENGL_PLATFORM (default egl) unless the user already set them; returns the backend.

    Must run before mujoco/robosuite/libero are imported: they bind the GL platform at import time.
    """
    global _user_chose_gl
    if backend is not None and backend not in GL_BACKENDS:
        raise AssetError(f"unknown GL backend {backend!r}; choose one of {', '.join(GL_BACKENDS)}")
    if _user_chose_gl is None:
        _user_chose_gl = "MUJOCO_GL" in os.environ
    if backend is not None:
        os.environ["MUJOCO_GL"] = backend
        os.environ["PYOPENGL_PLATFORM"] = backend
        _user_chose_gl = True
    chosen = os.environ.setdefault("MUJOCO_GL", "egl")
    if chosen in GL_BACKENDS:
        os.environ.setdefault("PYOPENGL_PLATFORM", chosen)
    return chosen


def _gl_platform_bound() -> bool:
    """True once PyOpenGL/mujoco's GL module was imported: the backend can no longer change in-process."""
    return any(m in sys.modules for m in ("OpenGL", "mujoco.gl_context", "mujoco.egl", "mujoco.osmesa"))


def _mujoco_bound_backend() -> str | None:
    """The backend `mujoco.GLContext` was bound to at `import mujoco` ('' = glfw default), None if not yet."""
    mod = sys.modules.get("mujoco.gl_context")
    return None if mod is None else str(getattr(mod, "_MUJOCO_GL", ""))


def _probe_subprocess(backend: str, timeout: float = 120.0) -> tuple[bool, str]:
    env = dict(os.environ, MUJOCO_GL=backend, PYOPENGL_PLATFORM=backend)
    try:
        r = subprocess.run([sys.executable, "-c", _probe_src(backend)], env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"{backend} probe timed out after {timeout:.0f} s"
    ok = r.returncode == 0 and "GL_PROBE_OK" in r.stdout
    tail = (r.stderr.strip().splitlines() or [f"rc {r.returncode}"])[-1]
    return ok, tail


def _probe_in_process(backend: str) -> None:
    ns: dict[str, Any] = {}
    src = _probe_src(backend).replace('print("GL_PROBE_OK")', "")
    exec(compile(src, "<gl-probe>", "exec"), ns)  # noqa: S102 - our own constant source


def _gl_error(backend: str, detail: str) -> AssetError:
    pk = DEBIAN_PACKAGES.get(backend, " ".join(DEBIAN_PACKAGES.values()))
    return AssetError(f"offscreen rendering with MUJOCO_GL={backend} failed ({detail}); install the GL "
                      f"libraries (Debian/Ubuntu: apt-get install {pk}; for the OSMesa fallback: "
                      f"apt-get install {DEBIAN_PACKAGES['osmesa']}) or set MUJOCO_GL=osmesa")


def check_gl() -> str:
    """Render a tiny scene offscreen; returns the working backend or raises AssetError.

    If the user did not choose a backend and the GL platform is not bound yet, EGL is probed in a subprocess
    first (a failed EGL init cannot be undone in-process) and OSMesa is used when EGL fails.
    """
    global _gl_checked
    backend = setup_gl()
    if _gl_checked == backend:
        return backend
    if not _user_chose_gl and not _gl_platform_bound():
        ok, detail = _probe_subprocess(backend)
        if not ok:
            ok2, detail2 = _probe_subprocess("osmesa")
            if not ok2:
                raise _gl_error(backend, f"{detail}; osmesa: {detail2}")
            log.warning("MUJOCO_GL=%s does not work here (%s); falling back to osmesa", backend, detail)
            os.environ["MUJOCO_GL"] = "osmesa"
            os.environ["PYOPENGL_PLATFORM"] = "osmesa"
            backend = "osmesa"
    bound = _mujoco_bound_backend()
    if bound is not None and bound != backend:
        log.warning("mujoco was imported with MUJOCO_GL=%s: robosuite still renders with %s, but "
                    "mujoco.GLContext/mujoco.Renderer will not work headless; call "
                    "vla_runtime.envs.render.setup_gl() before importing mujoco", bound or "<unset>", backend)
    prepare_robosuite_import()  # triton before the GL driver loads
    try:
        _probe_in_process(backend)
    except Exception as e:  # re-raised as a user-facing error naming the fix
        raise _gl_error(backend, f"{type(e).__name__}: {e}") from e
    _gl_checked = backend
    return backend


class _DropMacroNag(logging.Filter):
    """Drops only robosuite's three-line 'No private macro file' nag at import; everything else passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not ("private macro file" in msg or "setup_macros.py" in msg)


def system_llvm_loaded() -> bool:
    """True if a system libLLVM (pulled in by Mesa's GL driver) is mapped into this process."""
    try:
        with open("/proc/self/maps") as f:
            return any("libLLVM" in line for line in f)
    except OSError:
        return False


def prepare_robosuite_import() -> None:
    """Call before importing robosuite/mujoco/libero: GL env vars, triton-before-GL, no macro-file nag.

    Importing triton first makes a later `import triton` (kernels, torch.compile) safe in a process that
    renders. If the GL driver is already loaded without triton, that cannot be repaired: we warn.
    """
    setup_gl()
    if not _has_nag_filter():
        logging.getLogger("robosuite_logs").addFilter(_DropMacroNag())
    if "triton" not in sys.modules and importlib.util.find_spec("triton") is not None:
        if system_llvm_loaded():
            log.warning("the GL driver (system libLLVM) is already loaded: a later `import triton` will "
                        "segfault; call vla_runtime.envs.render.prepare_robosuite_import() before importing "
                        "mujoco/robosuite")
        else:
            try:
                import triton  # noqa: F401  - import order matters, see module docstring
            except ImportError as e:  # a broken triton must not stop simulation; kernels fall back to torch
                log.warning("import triton failed (%s); a later import may crash after rendering", e)


def import_robosuite() -> Any:
    """`prepare_robosuite_import()`, then `import robosuite` without its deprecated-`warn` DeprecationWarnings."""
    prepare_robosuite_import()
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The 'warn' method is deprecated", category=DeprecationWarning)
        import robosuite
    return robosuite


def _has_nag_filter() -> bool:
    return any(isinstance(f, _DropMacroNag) for f in logging.getLogger("robosuite_logs").filters)


# ----------------------------------------------------------------------------------------------- fast render

def apply_fast_render(mj_model: Any) -> None:
    """Model-level fast settings: no offscreen MSAA, no shadow-casting lights.

    `offsamples` is read when an MjrContext is created, so contexts made before this call must be rebuilt
    (`apply_fast_render_context`). Accepts a raw `mujoco.MjModel` or robosuite's wrapper (`sim.model`).
    """
    m = getattr(mj_model, "_model", mj_model)
    m.vis.quality.offsamples = 0
    m.light_castshadow[:] = 0


def apply_fast_render_context(ctx: Any) -> None:
    """Scene flags off (shadows, reflections) and the GPU context rebuilt so `offsamples=0` takes effect.

    `ctx` is robosuite's `MjRenderContext` (`sim._render_context_offscreen`): it has `.scn`, `.con`,
    `.gl_ctx`, `.model` and `_set_mujoco_context_and_buffers()`.
    """
    import mujoco

    ctx.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
    ctx.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
    m = getattr(ctx.model, "_model", ctx.model)
    if ctx.con.offSamples != m.vis.quality.offsamples:
        ctx.gl_ctx.make_current()
        ctx.con.free()
        ctx._set_mujoco_context_and_buffers()


def apply_fast_render_sim(sim: Any) -> None:
    """Both of the above for a robosuite `MjSim` (its offscreen context is created on the env's first reset)."""
    apply_fast_render(sim.model)
    ctx = getattr(sim, "_render_context_offscreen", None)
    if ctx is not None:
        apply_fast_render_context(ctx)
