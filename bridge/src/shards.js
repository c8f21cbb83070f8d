// Where things live: task shards (Durable Objects chosen by hashed task id), the per-peer
// gates (nonces and rate limit) and the control object (master keys, cache generations,
// the directory of shards holding queued tasks of a kind).

export const MAX_SHARDS = 256;

// The SHARDS var (wrangler.jsonc): how many task shards. Changing it re-maps task ids to
// shards, so drain the queue first (docs/BRIDGE.md).
export function shardCount(env) {
  const n = Number(env.SHARDS ?? 1);
  return Number.isInteger(n) && n >= 1 && n <= MAX_SHARDS ? n : 1;
}

// FNV-1a (32 bit) of the id's UTF-16 units: cheap, stable and spread enough for routing.
export function shardOf(id, n) {
  let h = 0x811c9dc5;
  for (let i = 0; i < id.length; i++) {
    h ^= id.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h % n;
}

export function shardStub(env, index) {
  return env.QUEUE.get(env.QUEUE.idFromName(`shard-${index}`));
}

export function taskShard(env, id) {
  const i = shardOf(id, shardCount(env));
  return { index: i, stub: shardStub(env, i) };
}

export function gateStub(env, peer) {
  return env.GATE.get(env.GATE.idFromName(`peer/${peer}`));
}

export function controlStub(env) {
  return env.CONTROL.get(env.CONTROL.idFromName("control"));
}
