"""The experiment runner: `python -m launcher.experiment` (research/experiment.py).

The command keeps its documented name; the code lives with its concern."""

import sys

from core.cli import run_main
from research.experiment import main

if __name__ == "__main__":
    sys.exit(run_main(main))
