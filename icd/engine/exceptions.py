"""How training stops early, and the exit status each way gives."""
from __future__ import annotations


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; nothing after the last good checkpoint was saved."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training; the message names the last checkpoint and how to resume it."""


# The exit statuses of training (icd.commands.runner's): also those of a worker of several that
# fails (icd.distributed.failures_end_the_process), so the launcher exits with them.
EXIT_STATUSES = {TrainingDiverged: 3, KeyboardInterrupt: 130}
