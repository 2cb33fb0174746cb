"""The stitch benchmark from a checkout; the code ships with the package as tcfa.bench.stitch
(`tcfa bench stitch` runs it from any install)."""
from tcfa.bench.stitch import run

run()
