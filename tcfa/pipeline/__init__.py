"""The model pipeline: layer taps on any nn.Module (timm, transformers, plain torch),
activation layouts, StitchedModel, condition builders, fitting and tuning, metrics and
baselines. Built on the numerics layer (tcfa.ot, tcfa.stats, tcfa.stitch); the public
names are re-exported by tcfa/__init__.py."""
