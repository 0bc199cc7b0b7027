/* LD_PRELOAD for the load generators, to choose the source address of their IPv4 sockets:
 * each is bound to BENCH_SOURCE_ADDRESS, or, with BENCH_SOURCE_COUNT=N, to the next of the N
 * consecutive addresses starting there (round robin). h2load cannot choose its source at all
 * (DoH runs from 127.0.0.1 or 127.0.0.2 like dnsperf's -a for UDP and DoT); the handshake
 * benchmark spreads dnsperf's new connections over many sources, since smartdns limits new
 * handshakes per source address. A socket the program binds to the wildcard address gets the
 * chosen address instead; one it connects unbound is bound first.
 * Built by bench/tools.py into the run's temporary directory. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*socket_call)(int, const struct sockaddr *, socklen_t);

static socket_call real(socket_call *cached, const char *name)
{
    if (*cached == NULL)
        *cached = (socket_call)dlsym(RTLD_NEXT, name);
    return *cached;
}

/* The next source address into `local`; 0, or -1 with errno set when the setting is bad. */
static int choose(struct sockaddr_in *local)
{
    static unsigned long next;
    const char *source = getenv("BENCH_SOURCE_ADDRESS");
    const char *count = getenv("BENCH_SOURCE_COUNT");
    unsigned long spread = count != NULL ? strtoul(count, NULL, 10) : 1;

    if (inet_pton(AF_INET, source, &local->sin_addr) != 1 || spread == 0) {
        errno = EINVAL;
        return -1;
    }
    unsigned long offset = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED) % spread;
    local->sin_addr.s_addr = htonl(ntohl(local->sin_addr.s_addr) + (uint32_t)offset);
    return 0;
}

int bind(int fd, const struct sockaddr *address, socklen_t length)
{
    static socket_call real_bind;
    struct sockaddr_in local;

    if (getenv("BENCH_SOURCE_ADDRESS") == NULL || address->sa_family != AF_INET
        || length < sizeof local)
        return real(&real_bind, "bind")(fd, address, length);
    memcpy(&local, address, sizeof local);
    if (local.sin_addr.s_addr != htonl(INADDR_ANY))
        return real(&real_bind, "bind")(fd, address, length);
    if (choose(&local) != 0)
        return -1;
    return real(&real_bind, "bind")(fd, (const struct sockaddr *)&local, sizeof local);
}

int connect(int fd, const struct sockaddr *address, socklen_t length)
{
    static socket_call real_connect;
    struct sockaddr_in local = {.sin_family = AF_INET};
    socklen_t local_length = sizeof local;

    if (getenv("BENCH_SOURCE_ADDRESS") != NULL && address->sa_family == AF_INET
        && getsockname(fd, (struct sockaddr *)&local, &local_length) == 0 && local.sin_port == 0) {
        /* Not bound yet. No silent fallback to the kernel's choice: a failure fails the
         * connection, and the run counts it. */
        local = (struct sockaddr_in){.sin_family = AF_INET};
        if (bind(fd, (const struct sockaddr *)&local, sizeof local) != 0)
            return -1;
    }
    return real(&real_connect, "connect")(fd, address, length);
}
