#!/usr/bin/env bash
# Start a loopback-only js-ipfs 0.66.1 daemon (Kubo RPC API) for tests/test_kubo.py.
# Usage: start-jsipfs.sh REPO_DIR API_PORT SWARM_PORT
#   REPO_DIR must not exist yet; the daemon's output goes to REPO_DIR.log.
#   Prints the daemon's PID (the node process itself, named "ipfs") and returns at once;
#   the API answers a few seconds later. Stop it with kill PID.
# Needs scripts/setup-jsipfs (node_modules next to this file) and Node >= 18.
#
# One node process both initialises and runs the repo (`jsipfs init` + `jsipfs config` +
# `jsipfs daemon` would load js-ipfs three times or more: ~3x slower to start):
#   --init-profile test   no bootstrap peers, no mDNS, no NAT port mapping;
#   --init-config FILE    merged over the defaults: API and swarm on 127.0.0.1 only, no
#                         gateway, no gRPC server (its default port 5003 is fixed and would
#                         clash), no delegates, empty bootstrap list;
#   --enable-preload=false  or it contacts node*.preload.ipfs.io on every add.
set -euo pipefail
if (( $# != 3 )); then
    echo "usage: $0 REPO_DIR API_PORT SWARM_PORT" >&2
    exit 2
fi
REPO=$1; API=$2; SWARM=$3
DIR=${JSIPFS_DIR:-$(cd "$(dirname "$0")" && pwd)}
BIN=$DIR/node_modules/.bin/jsipfs
if [[ ! -x $BIN ]]; then
    echo "start-jsipfs: $BIN is missing; run scripts/setup-jsipfs" >&2
    exit 2
fi
if [[ -e $REPO ]]; then
    echo "start-jsipfs: $REPO already exists; give a new directory" >&2
    exit 2
fi
export IPFS_PATH=$REPO
# Node 20 lacks Promise.withResolvers, which it-queue (via mortice) needs.
export NODE_OPTIONS="--require $DIR/polyfill.cjs ${NODE_OPTIONS:-}"
cat >"$REPO.init.json" <<JSON
{
  "Addresses": {
    "API": "/ip4/127.0.0.1/tcp/$API",
    "Swarm": ["/ip4/127.0.0.1/tcp/$SWARM"],
    "Gateway": [],
    "RPC": "",
    "Announce": [],
    "NoAnnounce": [],
    "Delegates": []
  },
  "Bootstrap": [],
  "Discovery": {"MDNS": {"Enabled": false}, "webRTCStar": {"Enabled": false}}
}
JSON
nohup "$BIN" daemon --init-profile test --init-config "$REPO.init.json" \
    --enable-preload=false >"$REPO.log" 2>&1 </dev/null &
echo $!
