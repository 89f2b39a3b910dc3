/* The capture object: one ELF so every program shares the maps in maps.h. Each program lives in
 * its own short file; this file only gathers them. */
#include "connect.c"
#include "sendmsg.c"
#include "recvmsg.c"
#include "getpeername.c"
#include "sockops.c"
#include "sk_lookup.c"
#include "local_hop.c"

char LICENSE[] SEC("license") = "GPL";

/* Read by no program: it puts enum abi_constant into the object's BTF, where tests/abi.rs
 * checks the values against abi.rs. */
const volatile enum abi_constant abi_constants = SSH_PORT;
