"""CPU of one jobrelay client per trivial payload, with no server (issue 18).

    python3 crates/bench/scripts/client_cpu.py JOBRELAY_BINARY PORT [N]

Starts `JOBRELAY client` on 127.0.0.1:PORT with a fresh data directory and 2 slots, runs 70
payloads of `echo hi > out.txt` to warm it up (past its 64 exit slots), then N more (default
200), one at a time through curl: submit, wait 30 ms, fetch the ZIP (again every 10 ms until it
is one), release. Prints the client process's own CPU per payload and that of its children
(the fork server with the supervisors and bash it reaped), from /proc/PID/stat.
"""
import glob
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

binary, port = sys.argv[1], int(sys.argv[2])
n = int(sys.argv[3]) if len(sys.argv) > 3 else 200
d = tempfile.mkdtemp(prefix="client-cpu-")
open(f"{d}/run.sh", "w").write("echo hi > out.txt\n")
client = subprocess.Popen(
    [binary, "client", "--port", str(port), "--data-dir", f"{d}/data", "--slots", "2"],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
)
base = f"http://127.0.0.1:{port}"
for _ in range(100):
    try:
        urllib.request.urlopen(base + "/health")
        break
    except OSError:
        time.sleep(0.05)


def cpu(pid):
    """(own, reaped children's) CPU seconds of a process."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


def one(i):
    subprocess.run(["curl", "-sf", "-F", f"file=@{d}/run.sh", base + "/submit"], stdout=subprocess.DEVNULL, check=True)
    time.sleep(0.03)
    while subprocess.run(["curl", "-sf", f"{base}/retrieve/{i}"], capture_output=True).stdout[:2] != b"PK":
        time.sleep(0.01)
    subprocess.run(["curl", "-sf", "-X", "POST", f"{base}/release/{i}"], stdout=subprocess.DEVNULL, check=True)


try:
    for i in range(1, 71):
        one(i)
    children = [int(x) for t in glob.glob(f"/proc/{client.pid}/task/*/children") for x in open(t).read().split()]
    before = cpu(client.pid), [cpu(c) for c in children]
    for i in range(71, 71 + n):
        one(i)
    after = cpu(client.pid), [cpu(c) for c in children]
    own = (after[0][0] - before[0][0]) / n * 1e3
    kids = sum(b[0] - a[0] + b[1] - a[1] for a, b in zip(before[1], after[1])) / n * 1e3
    print(f"{binary}: client {own:.2f} ms per payload; fork server, supervisors and bash {kids:.2f} ms")
finally:
    client.terminate()
    client.wait()
    subprocess.run(["rm", "-rf", d])
