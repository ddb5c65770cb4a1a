"""Export a run to Hugging Face format: `python -m launcher.export_hf` (export/cli.py).

The command keeps its documented name; the code lives with its concern."""

import sys

from core.cli import run_main
from export.cli import main

if __name__ == "__main__":
    sys.exit(run_main(main))
