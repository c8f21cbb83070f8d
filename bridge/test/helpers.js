import { SELF } from "cloudflare:test";

export const KEY_HEX = "7e57".repeat(16);

function hex(buf) {
  return [...new Uint8Array(buf)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

export function randomHex(n = 16) {
  return hex(crypto.getRandomValues(new Uint8Array(n)));
}

export async function sign({ method, path, body = "", keyHex = KEY_HEX, ts, nonce }) {
  const bytes = typeof body === "string" ? new TextEncoder().encode(body) : body;
  const bodyHash = hex(await crypto.subtle.digest("SHA-256", bytes));
  ts = ts ?? String(Math.floor(Date.now() / 1000));
  nonce = nonce ?? randomHex();
  const raw = new Uint8Array(keyHex.match(/../g).map((h) => parseInt(h, 16)));
  const key = await crypto.subtle.importKey("raw", raw, { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  const msg = `${method}\n${path}\n${ts}\n${nonce}\n${bodyHash}`;
  const sig = hex(await crypto.subtle.sign("HMAC", key, new TextEncoder().encode(msg)));
  return { "X-Teammesh-Timestamp": ts, "X-Teammesh-Nonce": nonce, "X-Teammesh-Signature": sig };
}

// Signed request through the Worker; returns {status, json, text, headers}.
export async function call(method, path, body, { peer = "vitest", headers = {}, signOpts = {}, sign: doSign = true } = {}) {
  const text = body === undefined ? "" : typeof body === "string" ? body : JSON.stringify(body);
  const h = { "Content-Type": "application/json", "X-Teammesh-Peer": peer, ...headers };
  if (doSign) Object.assign(h, await sign({ method, path, body: text, ...signOpts }));
  const res = await SELF.fetch("https://bridge.test" + path, {
    method,
    headers: h,
    body: method === "GET" ? undefined : text,
  });
  const out = await res.text();
  let json = null;
  try {
    json = JSON.parse(out);
  } catch {
    /* not JSON */
  }
  return { status: res.status, json, text: out, headers: res.headers };
}

export function b64(s) {
  return btoa(s);
}
