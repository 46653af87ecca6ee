"""Run `softmix dask` on a SLURM cluster through dask-jobqueue.

Usage (on a login node, inside the project's virtual environment with the `slurm`
extra installed: `pip install -e ".[cpu,slurm]"`):

    python deploy/slurm/softmix_slurm.py --jobs 4 --cores 8 --memory 32GB \
        --walltime 02:00:00 --queue normal -- --manifest /data/manifest.csv --out /data/out

Everything after `--` is the `softmix dask` command's own flags (the same flags as
`softmix beam`); `--scheduler` is set by this script.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.cli import build_parser, job_config_from_args
from pipeline.run.job import summary_table


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, _, job_flags = _split(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="SLURM jobs (one worker each)")
    parser.add_argument("--cores", type=int, default=4, help="cores per SLURM job")
    parser.add_argument("--memory", default="16GB", help="memory per SLURM job")
    parser.add_argument("--processes", type=int, default=None,
                        help="worker processes per job (default: one per core)")
    parser.add_argument("--walltime", default="01:00:00")
    parser.add_argument("--queue", default=None, help="SLURM partition")
    parser.add_argument("--account", default=None)
    args = parser.parse_args(ours)
    job_args = build_parser().parse_args(["dask", *job_flags])
    job = job_config_from_args(job_args)

    from dask_jobqueue import SLURMCluster
    from distributed import Client

    from pipeline.engines.dask import run_dask

    processes = args.processes or args.cores
    cluster = SLURMCluster(
        cores=args.cores, processes=processes, memory=args.memory, walltime=args.walltime,
        queue=args.queue, account=args.account,
        # One TensorFlow thread per worker process: no core oversubscription.
        job_script_prologue=["export SOFTMIX_TF_THREADS=1", "export TF_CPP_MIN_LOG_LEVEL=2"],
    )
    cluster.scale(jobs=args.jobs)
    with cluster, Client(cluster) as client:
        print(f"dashboard: {client.dashboard_link}")
        manifest = run_dask(job, client=client, progress=not job_args.no_progress)
    print(summary_table(manifest))
    return 0


def _split(argv: list[str]) -> tuple[list[str], str, list[str]]:
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], "--", argv[cut + 1:]
    return argv, "", []


if __name__ == "__main__":
    sys.exit(main())
