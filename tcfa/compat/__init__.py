"""Front-ends with the peers' signatures on tcfa's kernels: ``tcfa.compat.pot`` (POT's entropic OT
functions). Import the module you need: ``import tcfa.compat.pot as ot``."""
