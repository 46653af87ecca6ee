"""The local Beam runner's SDK worker process (`softmix beam --workers N`, N > 1).

Beam's own worker (`apache_beam.runners.worker.sdk_worker_main`), started with one
thing first: TensorFlow and the mixing op begin importing in a background thread
(`tasks.prewarm_mixing`) as the process starts, while Beam starts its harness and the
worker plans and packs. Every local worker mixes later, and the import (~3 CPU s) no
longer waits for the first bucket: a resumed run, whose plans and packs are checked in
a second, reaches its first new bucket that much sooner.

Started by `engines.beam` as ``python -m pipeline.engines.beam_worker``; the runner
passes it everything else in the environment, as it does to Beam's own command.
"""

from __future__ import annotations

import sys


def main() -> None:
    from ..run.tasks import prewarm_mixing

    prewarm_mixing()
    from apache_beam.runners.worker import sdk_worker_main

    sdk_worker_main.main(sys.argv)


if __name__ == "__main__":
    main()
