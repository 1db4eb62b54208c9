"""Repository tools outside the package: result tables over seeds, the bundled-sample maker, peer benchmarks."""
