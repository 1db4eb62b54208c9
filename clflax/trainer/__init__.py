"""The continual trainer: setup, stages, steps, optimizer, consolidation, evaluation, checkpoints, workdirs."""
