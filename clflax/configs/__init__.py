"""clflax's config builders: `default.get_config(arg)` (the vision run, every field commented) and the classic
MNIST protocols (`mnist.permuted / rotated / split`). Experiment files, the repository's or your own, start from
them: `config = default.get_config(arg); config.strategy.names = ('agem',)`."""
