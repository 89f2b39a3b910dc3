/* The capture object: one ELF so every program shares the maps in maps.h. Each program lives in
 * its own short file; this file only gathers them. */
#include "connect.c"
#include "sendmsg.c"
#include "recvmsg.c"
#include "getpeername.c"
#include "sockops.c"
#include "sk_lookup.c"

char LICENSE[] SEC("license") = "GPL";
