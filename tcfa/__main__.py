"""`python -m tcfa ...` is the `tcfa` command (tcfa.cli)."""
import sys

from .cli import main

sys.exit(main())
