"""The conditioning probe: `python -m launcher.conditioning` (research/conditioning.py).

The command keeps its documented name; the code lives with its concern."""

import sys

from core.cli import run_main
from research.conditioning import main

if __name__ == "__main__":
    sys.exit(run_main(main))
