#!/bin/bash
# Files a jobrelay client makes and removes per trivial payload, in steady state (issue 18:
# on a journal-less ext4 each new inode scans the recently freed ones).
#
#   crates/bench/scripts/client_inodes.sh JOBRELAY_BINARY [PORT]
#
# Starts a client on 127.0.0.1:PORT (default 47300) with a fresh data directory, runs 70
# payloads of `echo hi > out.txt` to warm it up (past the 64 exit slots), then traces
# (strace -f) the next 20 from
# submission to release and prints, per payload, the opens that made a new file (O_CREAT on a
# path that did not exist before), the directories made and the files and directories
# removed, outside the cgroup file system. Needs strace and curl.
set -euo pipefail
BIN=$1
PORT=${2:-47300}
D=$(mktemp -d)
trap 'rm -rf "$D"' EXIT
printf 'echo hi > out.txt\n' > "$D/run.sh"
"$BIN" client --port "$PORT" --data-dir "$D/data" --slots 2 > "$D/log" 2>&1 &
CPID=$!
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 0.1; done
run() {
  for i in $(seq "$1" "$2"); do curl -sf -F file=@"$D/run.sh" "http://127.0.0.1:$PORT/submit" > /dev/null; done
  for i in $(seq "$1" "$2"); do
    until curl -sf "http://127.0.0.1:$PORT/retrieve/$i" -o "$D/zip" && [ "$(head -c 2 "$D/zip")" = PK ]; do sleep 0.05; done
    curl -sf -X POST "http://127.0.0.1:$PORT/release/$i" > /dev/null
  done
}
run 1 70
find "$D/data" -type f > "$D/before"
PIDS=$(printf -- '-p %s ' "$CPID" $(pgrep -P "$CPID" || true))
strace -f -qq $PIDS -o "$D/trace" -e trace=openat,mkdir,unlink,unlinkat,rmdir &
SPID=$!
sleep 1
run 71 90
sleep 0.5
kill "$SPID"; wait "$SPID" 2>/dev/null || true
kill "$CPID"; wait "$CPID" 2>/dev/null || true
# An O_CREAT open made a file when the path was not there before tracing nor seen since;
# a relative path is the job's own (out.txt in its work directory): new each time.
python3 - "$D/trace" "$D/before" <<'PY'
import re, sys, collections
seen = set(open(sys.argv[2]).read().split())
made, dirs, removed = collections.Counter(), 0, 0
calls = collections.defaultdict(str)
for line in open(sys.argv[1]):
    pid, rest = line.split(None, 1)
    if '<unfinished ...>' in rest:
        calls[pid] = rest.split('<unfinished')[0]; continue
    m = re.match(r'<\.\.\. \w+ resumed>(.*)', rest)
    if m:
        rest = calls.pop(pid, '') + m.group(1)
    if '/sys/fs/cgroup' in rest or re.search(r'= -1 ', rest):
        continue
    path = re.search(r'"([^"]*)"', rest)
    path = path.group(1) if path else ''
    if rest.startswith('openat(') and 'O_CREAT' in rest:
        key = re.sub(r'\d+', 'N', path)
        if path not in seen or not path.startswith('/'): made[key] += 1
        seen.add(path)
    elif rest.startswith('mkdir('):
        dirs += 1
    elif rest.startswith(('unlink', 'rmdir')):
        removed += 1
n = 20
print(f"per payload: new files {sum(made.values())/n:.2f}, directories made {dirs/n:.2f}, removed {removed/n:.2f}")
for key, count in made.most_common():
    print(f"  {count/n:.2f}  {key}")
PY
