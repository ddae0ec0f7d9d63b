"""The swap probe (vla_runtime/policies/probe.py) attributes a prediction to the input it really comes from."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from vla_runtime.errors import UserError
from vla_runtime.policies.probe import load_probe_demos, swap_pairs, swap_probe
from vla_runtime.runtime.types import ActionChunk, Observation, PolicySpec
from vla_runtime.train.demos import list_demos, write_dummy_demos

STEP, H = 2, 4


class Oracle:
    """Answers each probed frame with the expert's true next-H actions, looked up by ONE input: the images
    (`key="images"`) or the proprio state (`key="state"`); the other input is ignored."""

    def __init__(self, demos, key: str):
        self.key = key
        self.spec = PolicySpec(action_dim=demos[0].actions.shape[1], chunk_size=H, n_action_steps=H,
                               cameras=tuple(sorted(demos[0].images)), state_dim=demos[0].states.shape[1])
        self.table = {self._k(d.images[self.spec.cameras[0]][STEP], d.states[STEP]): d.actions[STEP:STEP + H]
                      for d in demos}
        self.resets = 0

    def _k(self, img, state) -> bytes:
        return np.ascontiguousarray(img).tobytes() if self.key == "images" else np.asarray(state, np.float32).tobytes()

    def reset(self, instruction: str) -> None:
        self.resets += 1

    def act(self, obs: Observation) -> ActionChunk:
        return ActionChunk(self.table[self._k(obs.images[self.spec.cameras[0]], obs.state)], stamp=obs.stamp)


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    d = tmp_path_factory.mktemp("probe_demos")
    write_dummy_demos(d, 9, seed0=40)
    cams = json.loads(h5py.File(list_demos(d)[0], "r").attrs["cameras"])
    out = load_probe_demos(d, cams, episodes=0, step=STEP)
    assert len(out) == 9 and all(len(x) > STEP + H for x in out)
    assert all(v.shape[0] == STEP + 1 for x in out for v in x.images.values())  # images only up to the probed frame
    return out


@pytest.mark.parametrize("key", ["images", "state"])
def test_probe_attributes_prediction_to_its_source(demos, key):
    pol = Oracle(demos, key)
    res = swap_probe(pol, demos, step=STEP, horizon=H, dims=(0, 1))
    assert res["pairs"] == 9 and res["horizon"] == H
    for s in res["dims"].values():
        assert s["r_own"] == pytest.approx(1.0)  # both oracles are perfect on the true observation
        follows, ignores = ("r_images", "r_state") if key == "images" else ("r_state", "r_images")
        assert s[follows] == pytest.approx(1.0)
        assert s[ignores] < 0.9
    if key == "state":  # the state oracle ignores the images: swapping them changes nothing
        assert all(s["mean_abs_change"] == 0.0 for s in res["dims"].values())
    else:
        assert all(s["mean_abs_change"] > 0.0 for s in res["dims"].values())
    assert pol.resets == 18  # every prediction starts a fresh episode (no history leaks between probes)


def test_swap_pairs_stay_within_task_and_use_every_source_once():
    tasks = ["a"] * 4 + ["b"] * 3 + ["c"]
    pairs = swap_pairs(tasks)
    assert [i for i, _ in pairs] == list(range(7))  # "c" has no partner: left out
    assert all(tasks[i] == tasks[j] and i != j for i, j in pairs)
    assert sorted(j for _, j in pairs) == list(range(7))


def test_probe_rejects_unusable_input(demos):
    pol = Oracle(demos, "images")
    with pytest.raises(UserError, match=">= 3 demos"):
        swap_probe(pol, demos[:2], step=STEP, horizon=H)
    with pytest.raises(UserError, match="horizon"):
        swap_probe(pol, demos, step=STEP, horizon=H + 1)
    with pytest.raises(UserError, match="dims"):
        swap_probe(pol, demos, step=STEP, horizon=H, dims=(0, 99))


def test_cli_probe_bad_input_is_one_line_error(tmp_path, capsys):
    from vla_runtime.cli import main

    assert main(["probe", "--policy", "vla:no_such_checkpoint", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vla-runtime: error:") and "Traceback" not in err
