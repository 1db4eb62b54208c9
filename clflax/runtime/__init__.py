"""Process-level setup: huge pages for XLA:CPU, joining a multi-process run."""
