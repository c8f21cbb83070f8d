// A Helia node for tests/test_bitswap.py: Bitswap only, TCP on 127.0.0.1, no discovery.
//
// No bootstrap, mDNS, relay, AutoNAT, UPnP, DHT, delegated routing or HTTP gateways:
// libp2p gets TCP + Noise + yamux + identify and nothing else, and Helia's block brokers
// are Bitswap alone, so this process talks only to the peers a test tells it to dial.
//
// Protocol: one JSON object per line on stdin, one JSON object per line on stdout.
//   first line out:  {"event":"ready","peer_id":...,"addrs":[...]}
//   {"id":n,"cmd":"connect","addr":MULTIADDR}
//   {"id":n,"cmd":"add","path":FILE,"kubo":true}    -> {"id":n,"cid":...,"ms":...}
//       kubo=true: 256 KiB chunks, 174 links, raw leaves, CIDv1 (ipfs add --cid-version=1);
//       kubo=false: Helia's defaults (1 MiB chunks, 1024 links)
//   {"id":n,"cmd":"cat","cid":CID,"out":FILE,"timeout_ms":30000} -> {"id":n,"bytes":...,"ms":...}
//   {"id":n,"cmd":"stop"}                             -> {"id":n,"ok":true}, then exit
// Errors come back as {"id":n,"error":"..."}.
import './polyfill.mjs'
import { createReadStream, createWriteStream } from 'node:fs'
import { once } from 'node:events'
import { createInterface } from 'node:readline'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { bitswap } from '@helia/block-brokers'
import { unixfs } from '@helia/unixfs'
import { identify } from '@libp2p/identify'
import { tcp } from '@libp2p/tcp'
import { multiaddr } from '@multiformats/multiaddr'
import { MemoryBlockstore } from 'blockstore-core'
import { MemoryDatastore } from 'datastore-core'
import { Helia } from '@helia/utils'
import { fixedSize } from 'ipfs-unixfs-importer/chunker'
import { balanced } from 'ipfs-unixfs-importer/layout'
import { createLibp2p } from 'libp2p'
import { CID } from 'multiformats/cid'

const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')

const libp2p = await createLibp2p({
  addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
  transports: [tcp()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  peerDiscovery: [],
  services: { identify: identify() },
  connectionManager: { maxConnections: 50 }
})
// The Helia class itself (what `createHelia` from the `helia` package builds): that
// package's default libp2p config imports WebRTC, whose native module cannot be built here.
const helia = new Helia({
  libp2p,
  blockstore: new MemoryBlockstore(),
  datastore: new MemoryDatastore(),
  blockBrokers: [bitswap()],
  routers: []
})
await helia.start()
const fs = unixfs(helia)

const KUBO = {
  cidVersion: 1,
  rawLeaves: true,
  chunker: fixedSize({ chunkSize: 262144 }),
  layout: balanced({ maxChildrenPerNode: 174 })
}

async function handle (req) {
  switch (req.cmd) {
    case 'connect':
      await libp2p.dial(multiaddr(req.addr), { signal: AbortSignal.timeout(10000) })
      return { ok: true }
    case 'add': {
      const t0 = performance.now()
      const cid = await fs.addByteStream(createReadStream(req.path, { highWaterMark: 1 << 20 }),
        req.kubo === false ? {} : KUBO)
      return { cid: cid.toString(), ms: performance.now() - t0 }
    }
    case 'cat': {
      const t0 = performance.now()
      const sink = createWriteStream(req.out)
      let bytes = 0
      const signal = AbortSignal.timeout(req.timeout_ms ?? 30000)
      for await (const chunk of fs.cat(CID.parse(req.cid), { signal })) {
        bytes += chunk.byteLength
        if (!sink.write(chunk)) await once(sink, 'drain')
      }
      sink.end()
      await once(sink, 'finish')
      return { bytes, ms: performance.now() - t0 }
    }
    case 'stop':
      return { ok: true, stop: true }
    default:
      throw new Error(`unknown command ${req.cmd}`)
  }
}

out({
  event: 'ready',
  peer_id: libp2p.peerId.toString(),
  addrs: libp2p.getMultiaddrs().map((a) => a.toString())
})

const lines = createInterface({ input: process.stdin })
for await (const line of lines) {
  if (!line.trim()) continue
  let req = {}
  try {
    req = JSON.parse(line)
    const res = await handle(req)
    out({ id: req.id, ...res })
    if (res.stop) break
  } catch (err) {
    out({ id: req.id, error: String(err?.stack ?? err) })
  }
}
await helia.stop()
process.exit(0)
