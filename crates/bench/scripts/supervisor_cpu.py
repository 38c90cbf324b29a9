#!/usr/bin/env python3
"""CPU of one trivial payload's supervisor + bash, exec'd per payload against forked by the
client's fork server (issue 18). Usage: supervisor_cpu.py JOBRELAY_BINARY exec|fork [N]

exec: runs `JOBRELAY __jobrelay-payload-supervisor <spec>` N times back to back (what the
client does without cgroups, and did for every payload before the fork server), each
`bash run.sh` with run.sh `echo hello > out.txt`; CPU from wait4's rusage (the supervisor
and the bash it reaped). fork: starts one `JOBRELAY __jobrelay-payload-supervisor --spawner`
on a socket pair, sends it N start requests one after the other (each waits for its
"ended"), then closes the socket; CPU from its rusage at exit (itself and every supervisor
and bash it reaped). Prints CPU ms per payload and per-payload wall time. No cgroup (the
spec has none) in either mode, so both do the same work but for the exec.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ARG = "__jobrelay-payload-supervisor"


def spec(root, i):
    return {
        "exit_file": os.path.join(root, "runs", str(i)),
        "cgroup": None,
        "memory_cgroup": None,
        "run_as": None,
        "limits": {},
        "argv": ["bash", "run.sh"],
    }


def main():
    binary, mode = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 300
    root = tempfile.mkdtemp(prefix="supervisor-cpu-")
    os.makedirs(os.path.join(root, "runs"))
    dirs = []
    for i in range(n):
        d = os.path.join(root, "work", str(i))
        os.makedirs(d)
        with open(os.path.join(d, "run.sh"), "w") as f:
            f.write("echo hello > out.txt\n")
        for name in (".jobrelay.stdout", ".jobrelay.stderr"):
            open(os.path.join(d, name), "w").close()
        dirs.append(d)
    cpu = 0.0
    begin = time.monotonic()
    if mode == "exec":
        for i, d in enumerate(dirs):
            out = open(os.path.join(d, ".jobrelay.stdout"), "w")
            err = open(os.path.join(d, ".jobrelay.stderr"), "w")
            p = subprocess.Popen(
                [binary, ARG, json.dumps(spec(root, i))],
                cwd=d, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True,
            )
            _, status, usage = os.wait4(p.pid, 0)
            p.returncode = 0
            assert os.waitstatus_to_exitcode(status) == 0, status
            cpu += usage.ru_utime + usage.ru_stime
    elif mode == "fork":
        ours, theirs = socket.socketpair()
        p = subprocess.Popen([binary, ARG, "--spawner"], stdin=theirs.fileno(),
                             stdout=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        replies = ours.makefile("r")
        for i, d in enumerate(dirs):
            request = {
                "req": i, "dir": d,
                "stdout": os.path.join(d, ".jobrelay.stdout"),
                "stderr": os.path.join(d, ".jobrelay.stderr"),
                "spec": spec(root, i),
            }
            ours.sendall((json.dumps(request) + "\n").encode())
            started = json.loads(replies.readline())
            assert started["reply"] == "started", started
            ended = json.loads(replies.readline())
            assert ended == {"reply": "ended", "pid": started["pid"], "code": 0}, ended
        replies.close()  # the file holds the socket open too
        ours.close()
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = 0
        cpu = usage.ru_utime + usage.ru_stime
    else:
        sys.exit("mode: exec or fork")
    wall = time.monotonic() - begin
    for d in dirs:
        with open(os.path.join(d, "out.txt")) as f:
            assert f.read() == "hello\n"
    print(f"{mode}: {n} payloads, CPU {cpu * 1e3 / n:.2f} ms per payload, "
          f"wall {wall * 1e3 / n:.2f} ms per payload")


if __name__ == "__main__":
    main()
