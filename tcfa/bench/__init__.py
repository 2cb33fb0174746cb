"""tcfa's benchmarks, shipped with the package so that `tcfa bench` runs from any install.

Each module (sinkhorn, stitch, cca, levels, layer_map) times tcfa and its peers in the same run,
prints a table with ratios and the machine, and writes <results>/<name>.json
(common.results_dir). They are scripts, not tests: nothing here is imported by tcfa itself.
"""
