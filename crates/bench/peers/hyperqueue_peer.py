"""HyperQueue peer of jobrelay-bench's throughput scenario.

Runs TASKS trivial `bash run.sh` tasks (each in a directory of its own that already holds
run.sh, stdout and stderr to files there, as jobrelay's client does) through HyperQueue's
`LocalCluster` (server and one worker of all cores in this process), submitted as USERS jobs
back to back, and prints one JSON line: tasks, seconds from the first submit to the end of the
last task, and the CPU seconds of this process (HyperQueue's server and worker) and of its
children (bash). The task directories are prepared before the clock starts: HyperQueue stages
nothing, keeps no durable state by default, and sends nothing back.

Usage: python hyperqueue_peer.py --dir DIR --tasks 5000 --users 16
"""

import argparse
import json
import os
import resource
import sys
import time


def cpu():
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--script", default="echo hello > out.txt\n")
    args = parser.parse_args()

    from hyperqueue import Job
    from hyperqueue.cluster import LocalCluster, WorkerConfig

    root = os.path.abspath(args.dir)
    work = os.path.join(root, "tasks")
    os.makedirs(work, exist_ok=True)
    dirs = []
    for i in range(args.tasks):
        d = os.path.join(work, str(i))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "run.sh"), "w") as f:
            f.write(args.script)
        dirs.append(d)

    with LocalCluster(server_dir=os.path.join(root, "hq-server")) as cluster:
        cluster.start_worker(WorkerConfig(cores=os.cpu_count()))
        client = cluster.client()
        # Warm-up: one task, so the worker is connected before the clock starts.
        warm = os.path.join(root, "warm")
        os.makedirs(warm, exist_ok=True)
        with open(os.path.join(warm, "run.sh"), "w") as f:
            f.write(args.script)
        job = Job()
        job.program(["bash", "run.sh"], cwd=warm, stdout=os.path.join(warm, ".stdout"),
                    stderr=os.path.join(warm, ".stderr"))
        client.wait_for_jobs([client.submit(job)])

        jobs = [Job() for _ in range(args.users)]
        for i, d in enumerate(dirs):
            jobs[i % args.users].program(
                ["bash", "run.sh"], cwd=d,
                stdout=os.path.join(d, ".stdout"), stderr=os.path.join(d, ".stderr"))
        cpu_before = cpu()
        start = time.monotonic()
        submitted = [client.submit(j) for j in jobs if j.tasks]
        ok = client.wait_for_jobs(submitted, raise_on_error=False)
        seconds = time.monotonic() - start
        cpu_after = cpu()
    missing = sum(1 for d in dirs if not os.path.exists(os.path.join(d, "out.txt")))
    print(json.dumps({
        "tasks": args.tasks, "users": args.users, "seconds": seconds, "ok": ok,
        "missing_outputs": missing,
        "cpu_s_hyperqueue": cpu_after[0] - cpu_before[0],
        "cpu_s_children": cpu_after[1] - cpu_before[1],
    }))
    return 0 if ok and missing == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
