/* LD_PRELOAD for h2load (the DoH load generator), which cannot choose its source address:
 * every IPv4 socket it connects is first bound to BENCH_SOURCE_ADDRESS, so DoH runs from
 * 127.0.0.1 (registered) or 127.0.0.2 (unregistered) like dnsperf's -a for UDP and DoT.
 * Built by bench/tools.py into the run's temporary directory. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>

int connect(int fd, const struct sockaddr *address, socklen_t length)
{
    static int (*real_connect)(int, const struct sockaddr *, socklen_t);
    const char *source = getenv("BENCH_SOURCE_ADDRESS");

    if (real_connect == NULL)
        real_connect = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "connect");
    if (source != NULL && address->sa_family == AF_INET) {
        struct sockaddr_in local = {.sin_family = AF_INET};
        /* No silent fallback to the kernel's choice (127.0.0.1): the run counts the error. */
        if (inet_pton(AF_INET, source, &local.sin_addr) != 1) {
            errno = EINVAL;
            return -1;
        }
        if (bind(fd, (const struct sockaddr *)&local, sizeof local) != 0)
            return -1;
    }
    return real_connect(fd, address, length);
}
