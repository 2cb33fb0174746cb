"""Renders benchmarks/results/*.json as markdown into README.md: tcfa/cli/bench_report.py."""
from tcfa.cli.bench_report import main

main()
