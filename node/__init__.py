"""The daemon, in rooms: core/ (home, config, journal, audit), p2p/ (host, membership, mesh),
files/ (blocks, Bitswap, Kubo), tasks/ (the task service and its executor), bridge/ (the
Worker's client), api/ (HTTP, control socket, dashboard), cli/ and kinds/. daemon.py is the
composition root that builds the services and hands each what it needs."""
