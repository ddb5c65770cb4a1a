"""Clean stops: signals and a stop file ask the run to save at the next step boundary and exit 0.

- SIGTERM or SIGINT (Ctrl-C): stop at the next step boundary, after saving a checkpoint.
- A second SIGINT: abort at once. `latest` still names the last complete checkpoint, because
  it moves only after every rank has finished writing (launcher/checkpoint.py).
- RUN_DIR/stop (any content): the same as the first signal, for launchers that cannot reach
  the ranks with a signal; ./run_pretrain.sh writes it when it is stopped. The run removes it
  once the stop is agreed.
- A closed stdout (`./run_pretrain.sh | head`) must not kill a rank before it saves:
  core.cli.run_main drops output to it from then on.
"""

from __future__ import annotations

import os
import signal

from run.rundir import RunDir


class StopRequest:
    """Whether this process was asked to stop; install() before the heavy set-up."""

    def __init__(self, run: RunDir):
        self.stop_file = run.stop_file
        self.signalled = False
        self.interrupts = 0

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts >= 2:
                os.write(2, b"\naborted by a second interrupt; the last complete checkpoint is kept\n")
                os._exit(130)

    def requested(self) -> bool:
        return self.signalled or self.stop_file.exists()

    def clear_file(self) -> None:
        self.stop_file.unlink(missing_ok=True)
