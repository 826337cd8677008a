/* Servers whose sockets change hands, for the owner tests: built with frame pointers and debug
 * info (gcc -O0 -g -fno-omit-frame-pointer -pthread), so tcp-trace can blame close() on
 * finish() in this file. Keep close() on line 17.
 *
 *   owners_peer PATTERN PORT WORKERS TEARDOWN
 *   PATTERN   prefork | reuseport | fork-after-accept | thread | scm-rights
 *   TEARDOWN  unread (close with the request unread: RST) | passive (read to EOF, then close)
 *
 * Prints "listening" when every listener is up, "worker PID" per process that may accept,
 * "accepted PID TID" when the task that will close a connection has it, "closing PID TID" just
 * before that socket's last close(), and exits when all are done: the
 * prefork and reuseport patterns serve one connection per worker, the others one. */
#define _GNU_SOURCE
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>
static void finish(int fd) { close(fd); }
#include <arpa/inet.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>

static int port, unread;

static void say(const char *what, long a, long b) {
    if (b >= 0)
        printf("%s %ld %ld\n", what, a, b);
    else if (a >= 0)
        printf("%s %ld\n", what, a);
    else
        printf("%s\n", what);
    fflush(stdout);
}

static int listener(int reuseport) {
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (reuseport)
        setsockopt(l, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 16)) {
        perror("bind/listen");
        exit(2);
    }
    return l;
}

/* A tracer symbolizing a close() needs the process alive (its memory map): stay until standard
 * input ends (the tests close it once the tracers are done; a shell's background job reads
 * /dev/null), then a moment more. */
static void hold(void) {
    char x;
    while (read(0, &x, 1) > 0) {}
    sleep(2);
}

/* The connection's end: wait for the request (unread: leave it queued; passive: read to the
 * peer's FIN), then the last close(). */
static void serve(int c) {
    char buf[256];
    say("accepted", getpid(), syscall(SYS_gettid));
    if (unread) {
        while (recv(c, buf, 1, MSG_PEEK) < 1) {}
    } else {
        while (recv(c, buf, sizeof buf, 0) > 0) {}
    }
    say("closing", getpid(), syscall(SYS_gettid));
    finish(c);
    hold();
}

/* N processes accept from `l` (one shared listener, or each its own with SO_REUSEPORT when
 * l < 0); each serves one connection and exits; the parent waits for them all. */
static void workers(int l, int n) {
    int ready[2];
    pipe(ready);
    pid_t kids[64];
    for (int i = 0; i < n && i < 64; i++) {
        kids[i] = fork();
        if (kids[i] == 0) {
            int mine = l >= 0 ? l : listener(1);
            say("worker", getpid(), -1);
            write(ready[1], "x", 1);
            int c = accept(mine, 0, 0);
            close(mine); /* the next connection goes to a worker still accepting */
            serve(c);
            _exit(0);
        }
    }
    for (int i = 0; i < n && i < 64; i++) {
        char x;
        read(ready[0], &x, 1);
    }
    if (l >= 0)
        close(l);
    say("listening", -1, -1);
    while (wait(NULL) > 0) {}
}

static void *thread_serve(void *arg) {
    serve((int)(long)arg);
    return NULL;
}

static void send_fd(int via, int fd) {
    char data = 'f';
    struct iovec io = {.iov_base = &data, .iov_len = 1};
    char ctl[CMSG_SPACE(sizeof(int))];
    memset(ctl, 0, sizeof ctl);
    struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = ctl,
                       .msg_controllen = sizeof ctl};
    struct cmsghdr *h = CMSG_FIRSTHDR(&m);
    h->cmsg_level = SOL_SOCKET;
    h->cmsg_type = SCM_RIGHTS;
    h->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(h), &fd, sizeof(int));
    sendmsg(via, &m, 0);
}

static int recv_fd(int via) {
    char data;
    struct iovec io = {.iov_base = &data, .iov_len = 1};
    char ctl[CMSG_SPACE(sizeof(int))];
    struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = ctl,
                       .msg_controllen = sizeof ctl};
    if (recvmsg(via, &m, 0) < 1)
        return -1;
    int fd;
    memcpy(&fd, CMSG_DATA(CMSG_FIRSTHDR(&m)), sizeof(int));
    return fd;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: owners_peer PATTERN PORT WORKERS unread|passive\n");
        return 2;
    }
    const char *pattern = argv[1];
    port = atoi(argv[2]);
    int n = atoi(argv[3]);
    unread = strcmp(argv[4], "unread") == 0;
    if (!strcmp(pattern, "prefork")) {
        workers(listener(0), n);
    } else if (!strcmp(pattern, "reuseport")) {
        workers(-1, n);
    } else if (!strcmp(pattern, "fork-after-accept")) {
        /* The parent accepts and hands the connection to a child, then closes its copy first. */
        int l = listener(0);
        say("worker", getpid(), -1);
        say("listening", -1, -1);
        int c = accept(l, 0, 0), go[2];
        pipe(go);
        pid_t kid = fork();
        if (kid == 0) {
            char x;
            read(go[0], &x, 1);
            serve(c);
            _exit(0);
        }
        close(c);
        write(go[1], "x", 1);
        waitpid(kid, NULL, 0);
    } else if (!strcmp(pattern, "thread")) {
        /* One thread accepts, another reads and closes. */
        int l = listener(0);
        say("worker", getpid(), -1);
        say("listening", -1, -1);
        int c = accept(l, 0, 0);
        pthread_t t;
        pthread_create(&t, NULL, thread_serve, (void *)(long)c);
        pthread_join(t, NULL);
    } else if (!strcmp(pattern, "scm-rights")) {
        /* The parent accepts and passes the socket to a child over SCM_RIGHTS, then closes its copy
         * before the child may serve, so the child's close() is the last. */
        int pair[2];
        socketpair(AF_UNIX, SOCK_STREAM, 0, pair);
        pid_t kid = fork();
        if (kid == 0) {
            close(pair[0]);
            int c = recv_fd(pair[1]);
            char x;
            read(pair[1], &x, 1); /* the parent's copy is closed: ours is the last */
            serve(c);
            _exit(0);
        }
        close(pair[1]);
        int l = listener(0);
        say("worker", getpid(), -1);
        say("listening", -1, -1);
        int c = accept(l, 0, 0);
        send_fd(pair[0], c);
        close(c);
        write(pair[0], "x", 1);
        waitpid(kid, NULL, 0);
    } else {
        fprintf(stderr, "unknown pattern %s\n", pattern);
        return 2;
    }
    return 0;
}
