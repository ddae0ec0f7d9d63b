"""`python tests/slow_eval.py eval ...`: the CLI with dummy:reach slowed to 20 ms per step.

Used by the kill tests (resume after kill, killed workers) so a kill lands mid-run. Spawned workers re-import
this file as their main module, which re-applies the patch; the guard keeps them from running the CLI.
"""

import sys
import time

from vla_runtime.envs import dummy

_step = dummy.DummyReachEnv.step


def slow_step(self, a):  # noqa: ANN001, ANN201 - test shim
    time.sleep(0.02)
    return _step(self, a)


dummy.DummyReachEnv.step = slow_step

if __name__ == "__main__":
    from vla_runtime.cli import main

    sys.exit(main(sys.argv[1:]))
