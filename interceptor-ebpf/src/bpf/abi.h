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

/* Why a local port is (not) captured inbound. */
enum inbound_action {
	INBOUND_CAPTURE = 1,
	INBOUND_EXCLUDE = 2,
};

/* Value of the inbound_ports map. */
struct inbound_port {
	enum inbound_action action; /* 4 bytes, as __u32 on the Rust side */
};

/* Key of the passthrough map: an LPM prefix over the 16 address bytes (IPv4 as ::ffff:a.b.c.d,
 * so an IPv4 /n is a /96+n here). */
struct cidr_key {
	__u32 prefixlen;
	__u32 addr[4]; /* network byte order */
};

/* What happens to TCP connections to destinations outside the mesh (outboundTrafficPolicy). */
enum outbound_traffic_mode {
	OUTBOUND_ALLOW_ANY = 0,
	OUTBOUND_REGISTRY_ONLY = 1,
};

/* Constants both sides must agree on. Enumerators (not #defines) so they are in the object's
 * BTF, where tests/abi.rs compares them with abi.rs. */
enum abi_constant {
	SSH_PORT = 22,                /* never captured inbound */
	INBOUND_SOURCE4 = 0x7f000006, /* 127.0.0.6: proxy::Inbound's own connections to the app */
};
