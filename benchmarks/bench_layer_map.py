"""The layer_map benchmark from a checkout; the code ships with the package as tcfa.bench.layer_map
(`tcfa bench layer_map` runs it from any install)."""
from tcfa.bench.layer_map import run

run()
