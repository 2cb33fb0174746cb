"""The cca benchmark from a checkout; the code ships with the package as tcfa.bench.cca
(`tcfa bench cca` runs it from any install)."""
from tcfa.bench.cca import run

run()
