"""The Sinkhorn iteration study from a checkout; the code ships with the package as
tcfa.bench.sinkhorn_iterations (`tcfa bench sinkhorn_iterations` runs it from any install)."""
from tcfa.bench.sinkhorn_iterations import run

run()
