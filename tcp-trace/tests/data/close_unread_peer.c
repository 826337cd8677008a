/* A server that closes a connection with unread data, from a known function and line: the
 * stack test builds it with frame pointers and debug info (gcc -O0 -g -fno-omit-frame-pointer)
 * and checks tcp-trace blames `finish` in this file. Keep close() on line 12. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

static void finish(int fd) {
    close(fd);
}

static void serve(int port) {
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    bind(l, (struct sockaddr *)&a, sizeof a);
    listen(l, 1);
    printf("listening\n");
    fflush(stdout);
    int c = accept(l, 0, 0);
    char buf[1];
    while (recv(c, buf, 1, MSG_PEEK) < 1) {}
    finish(c);
    sleep(3); /* a tracer symbolizing this close() needs the process alive a moment */
}

int main(int argc, char **argv) {
    serve(atoi(argv[1]));
    return 0;
}
