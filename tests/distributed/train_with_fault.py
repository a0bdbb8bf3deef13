"""torchrun entry: `tunelab train ...` whose rank 1 is killed (SIGKILL) at one optimizer step.

Only in the first attempt (TORCHELASTIC_RESTART_COUNT == 0), so under `torchrun
--max-restarts=1` the restarted job runs clean and must resume from the newest complete
checkpoint. Usage: train_with_fault.py KILL_AT_STEP <tunelab train arguments...>
"""

from __future__ import annotations

import os
import signal
import sys

from torch.optim.optimizer import register_optimizer_step_pre_hook


def main() -> int:
    kill_at = int(sys.argv[1])
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if first_attempt and os.environ.get("RANK") == "1":
        calls = 0

        def hook(optimizer, args, kwargs):
            nonlocal calls
            calls += 1
            if calls == kill_at:
                sys.stderr.write(f"[fault] killing rank 1 before optimizer step {kill_at}\n")
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)

        register_optimizer_step_pre_hook(hook)
    from tunelab.cli import main as cli

    return cli(["train", *sys.argv[2:]])


if __name__ == "__main__":
    sys.exit(main())
