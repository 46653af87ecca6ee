"""The job's steps as pure functions of their inputs and the seed: plan, pack, pair, mix, stain.

Nothing here imports `pipeline.run` or `pipeline.engines`."""
