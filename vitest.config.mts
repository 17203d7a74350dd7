import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    // Suites start real servers and executor processes; on a 2-core machine two at a time is
    // plenty, and fewer workers keep native runs from starving each other.
    maxWorkers: 2,
  },
});
