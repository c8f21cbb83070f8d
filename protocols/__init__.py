"""Wire formats and pure protocol state machines (sans-IO: no trio, no sockets, no clock)."""
