"""The README's "Bad input" table (tcfa/cli/bad_inputs.py): rewrite it, or --check that it is current."""
import sys

from tcfa.cli.bad_inputs import main

sys.exit(main(sys.argv[1:]))
