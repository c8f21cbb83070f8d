import { cloudflareTest } from "@cloudflare/vitest-pool-workers";
import { defineConfig } from "vitest/config";

// Offline: remoteBindings false; the test key and tighter rate limits are bindings.
export default defineConfig({
  plugins: [
    cloudflareTest({
      wrangler: { configPath: "./wrangler.jsonc" },
      remoteBindings: false,
      miniflare: {
        bindings: {
          BRIDGE_KEY: "7e57".repeat(16),
          RATE_PER_S: "1",
          RATE_BURST: "20",
          MAX_MC_SAMPLES: "2000000",
          SHARDS: "4",
          CONTROL_CACHE_S: "0",
        },
      },
    }),
  ],
  test: {
    include: ["test/**/*.test.js"],
    testTimeout: 30000,
  },
});
