"""Front-ends with the peers' signatures on tcfa's kernels: ``tcfa.compat.pot`` (POT's entropic OT
functions) and ``tcfa.compat.geomloss`` (GeomLoss's SamplesLoss for the Sinkhorn loss). Import the
one you need: ``import tcfa.compat.pot as ot``, ``from tcfa.compat.geomloss import SamplesLoss``."""
