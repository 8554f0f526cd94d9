"""`python -m scfoundation ARGS` is the `scf` command (for when the script is not on PATH)."""
import sys

from scfoundation.cli import main

sys.exit(main())
