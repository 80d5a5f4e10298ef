/*
 * The node's Pod sandbox process (containerd's sandbox image, k8s.gcr.io/pause:3.2): it holds a
 * Pod's namespaces open, does nothing else, and as PID 1 of the Pod reaps the children whose
 * parents exited before them. SIGINT and SIGTERM end it with status 0, as the kubelet expects.
 * Built static (`gcc -Os -static`) so the image needs nothing besides this one file.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int signal_number) {
    (void)signal_number;
    _exit(0);
}

static void reap(int signal_number) {
    (void)signal_number;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "-v") == 0) {
        printf("pause (aar) 3.2\n");
        return 0;
    }
    if (getpid() != 1) {
        /* Not an error: it runs the same way, only orphans are not ours to reap. */
        fprintf(stderr, "pause: not running as PID 1\n");
    }
    struct sigaction on_stop = {.sa_handler = stop};
    struct sigaction on_child = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};
    if (sigaction(SIGINT, &on_stop, NULL) < 0 || sigaction(SIGTERM, &on_stop, NULL) < 0 ||
        sigaction(SIGCHLD, &on_child, NULL) < 0) {
        perror("pause: sigaction");
        return 1;
    }
    for (;;) {
        pause();
    }
    return 42; /* never reached */
}
