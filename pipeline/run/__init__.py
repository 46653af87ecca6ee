"""One run: job parameters, the output directory's life cycle, checkpointed tasks."""
