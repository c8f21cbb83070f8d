#!/usr/bin/env bash
# Install the bridge's pinned toolchain (npm ci) and run the Worker's vitest suite
# offline; ends with a plain "N passed, N failed" line for CI.
set -uo pipefail
cd "$(dirname "$0")"
export WRANGLER_SEND_METRICS=false CLOUDFLARE_CF_FETCH_ENABLED=false NO_COLOR=1

if [ ! -d node_modules/wrangler ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund >/dev/null || { echo "npm ci failed in bridge/"; echo "0 passed, 1 failed"; exit 1; }
fi
# vitest reads .dev.vars through wrangler.jsonc; the suite sets its own key binding.
[ -f .dev.vars ] || printf 'BRIDGE_KEY=%s\n' "$(node -e 'console.log(require("crypto").randomBytes(32).toString("hex"))')" > .dev.vars

rm -f test-results.json
npx vitest run --reporter=default --reporter=json --outputFile=test-results.json
status=$?
if [ -f test-results.json ]; then
  node -e '
    const r = JSON.parse(require("fs").readFileSync("test-results.json", "utf8"));
    const skipped = (r.numPendingTests || 0) + (r.numTodoTests || 0);
    console.log(`${r.numPassedTests} passed, ${r.numFailedTests} failed` + (skipped ? `, ${skipped} skipped` : ""));
  '
else
  echo "0 passed, 1 failed"
  [ "$status" -ne 0 ] || status=1
fi
exit "$status"
