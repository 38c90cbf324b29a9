/* What it costs to put a new process into a cgroup v2 leaf (issue 18), two ways:
 *   move: fork, then the child writes "0" to the leaf's cgroup.procs (what the fork server did);
 *   clone: clone3 with CLONE_INTO_CGROUP, the child starts in the leaf (what it does now).
 * Per try: make a leaf, start the child, wait for it to exit, remove the leaf, sleep GAP ms.
 * Prints the milliseconds of each try, fork to reaped child.
 *
 *   gcc -O2 -o /tmp/cgroup_move crates/bench/scripts/cgroup_move.c
 *   /tmp/cgroup_move CGROUP2_DIR move|clone GAP_MS [TRIES]
 *
 * CGROUP2_DIR is a cgroup v2 directory this user may make children in (as root, the cgroup2
 * mount: /sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid set-up). A move takes the
 * cgroup threadgroup lock for writing, which waits for an RCU grace period unless another
 * move just did. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s CGROUP2_DIR move|clone GAP_MS [TRIES]\n", argv[0]);
        return 2;
    }
    int clone_in = strcmp(argv[2], "clone") == 0;
    int gap_ms = atoi(argv[3]);
    int tries = argc > 4 ? atoi(argv[4]) : 15;
    char base[4096];
    snprintf(base, sizeof base, "%s/jobrelay-cgroup-move-%d", argv[1], (int)getpid());
    if (mkdir(base, 0755) != 0) {
        perror(base);
        return 1;
    }
    for (int i = 0; i < tries; i++) {
        char leaf[4200];
        snprintf(leaf, sizeof leaf, "%s/l%d", base, i);
        if (mkdir(leaf, 0755) != 0) {
            perror(leaf);
            break;
        }
        double start = now_ms();
        pid_t pid;
        if (clone_in) {
            int fd = open(leaf, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            struct clone_args args;
            memset(&args, 0, sizeof args);
            args.flags = CLONE_INTO_CGROUP;
            args.exit_signal = SIGCHLD;
            args.cgroup = (unsigned long long)fd;
            pid = (pid_t)syscall(SYS_clone3, &args, sizeof args);
            if (pid == 0)
                _exit(0);
            close(fd);
        } else {
            pid = fork();
            if (pid == 0) {
                char procs[4300];
                snprintf(procs, sizeof procs, "%s/cgroup.procs", leaf);
                int fd = open(procs, O_WRONLY);
                _exit(fd >= 0 && write(fd, "0", 1) == 1 ? 0 : 1);
            }
        }
        if (pid < 0) {
            perror("fork");
            break;
        }
        int status;
        waitpid(pid, &status, 0);
        printf("%.2f ", now_ms() - start);
        rmdir(leaf);
        usleep(gap_ms * 1000);
    }
    printf("\n");
    rmdir(base);
    return 0;
}
