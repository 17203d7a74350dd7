import { describe, expect, it } from "vitest";
import { runLoad } from "../bench/reliability";

// The short version of `npm run test:reliability`'s load (1,000 jobs from 50 clients on 4
// executors, twice): many clients with jobs in flight at once, every one answered.
describe("the scheduler under load", () => {
  it("completes every job of many concurrent clients, twice over, with no failure", async () => {
    const result = await runLoad({ jobs: 60, clients: 6, executors: 2 });
    expect(result.rounds).toHaveLength(2);
    for (const round of result.rounds) {
      expect(round.failures).toEqual({});
      expect(round.completed).toBe(60);
    }
    // The memory figures are read from the scheduler process itself (Linux /proc).
    expect(result.rss_before_mib).toBeGreaterThan(0);
    expect(result.rss_during_peak_mib).toBeGreaterThan(0);
  }, 180_000);
});
