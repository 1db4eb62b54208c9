"""`python -m clflax.bench`: timings of the trainer's own steps (a tool; the library never imports it)."""
