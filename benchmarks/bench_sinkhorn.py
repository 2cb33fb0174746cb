"""The sinkhorn benchmark from a checkout; the code ships with the package as tcfa.bench.sinkhorn
(`tcfa bench sinkhorn` runs it from any install)."""
from tcfa.bench.sinkhorn import run

run()
