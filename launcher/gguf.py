"""`python -m launcher.gguf`: an export to GGUF for llama.cpp (the code is in export/gguf.py)."""

import sys

from core.cli import run_main
from export.gguf import main

if __name__ == "__main__":
    sys.exit(run_main(main))
