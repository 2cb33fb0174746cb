"""The memory benchmark from a checkout; the code ships with the package as tcfa.bench.memory
(`tcfa bench memory` runs it from any install)."""
from tcfa.bench.memory import main

main()
