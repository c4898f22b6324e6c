/* Listens on the ports given, reads each connection to EOF, answers the byte count. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    struct pollfd fds[8];
    int n = 0;
    for (int i = 1; i < argc && n < 8; i++, n++) {
        int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[i]))};
        if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 16)) { perror("bind"); return 1; }
        fds[n] = (struct pollfd){.fd = s, .events = POLLIN};
        printf("tcpsink: listening on %s\n", argv[i]);
    }
    fflush(stdout);
    char buf[65536];
    for (;;) {
        poll(fds, n, -1);
        for (int i = 0; i < n; i++) {
            if (!(fds[i].revents & POLLIN)) continue;
            int c = accept(fds[i].fd, NULL, NULL);
            long total = 0; ssize_t r;
            while ((r = read(c, buf, sizeof buf)) > 0) total += r;
            char reply[64];
            int len = snprintf(reply, sizeof reply, "%ld\n", total);
            write(c, reply, len);
            close(c);
        }
    }
}
