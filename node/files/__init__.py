"""Files: the block store service, Bitswap over the team mesh, and the optional Kubo node."""
