#!/usr/bin/env python
"""scripts/train.py with a test hook injected: SIGKILL this process right after step N.

Usage: train_until_killed.py N <the arguments of scripts/train.py>. The production
loop carries no kill switch; the tests add one through the Trainer's step hooks.
"""
import os
import runpy
import signal
import sys
from pathlib import Path

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train.py"


def kill_at(step: int):
    def hook(trainer, logs) -> None:
        if trainer.step == step:
            os.kill(os.getpid(), signal.SIGKILL)  # die like a killed job, after the step's checkpoint
    return hook


if __name__ == "__main__":
    step = int(sys.argv.pop(1))
    runpy.run_path(str(TRAIN_SCRIPT), run_name="train_script")["main"](step_hooks=(kill_at(step),))
