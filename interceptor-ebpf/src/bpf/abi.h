/* Types shared with userspace. Mirrored in ../abi.rs; tests/abi.rs checks the mirror against the
 * BTF of the built object, so a change here that is not made there fails the build's tests. */
#pragma once
#include <linux/types.h>

/* An endpoint address as both sides store it: every address is 16 bytes (IPv4 as ::ffff:a.b.c.d)
 * so one key type serves v4 sockets, v6 sockets and v4-mapped v6 sockets alike. */
struct ip_port {
	__u32 addr[4]; /* network byte order */
	__u16 port;    /* host byte order */
	__u16 family;  /* AF_INET for IPv4 (mapped) addresses, AF_INET6 otherwise */
};

/* Value of the inbound_ports map: why a local port is (not) captured inbound. */
struct inbound_port {
	__u32 action; /* INBOUND_CAPTURE or INBOUND_EXCLUDE */
};

#define INBOUND_CAPTURE 1
#define INBOUND_EXCLUDE 2
