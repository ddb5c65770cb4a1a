"""Generate text from an export: `python -m launcher.generate` (export/generate.py).

The command keeps its documented name; the code lives with its concern."""

import sys

from core.cli import run_main
from export.generate import main

if __name__ == "__main__":
    sys.exit(run_main(main))
