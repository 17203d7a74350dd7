import { describe, expect, it } from "vitest";
import { runSchedulerBench } from "../bench/scheduler";

// The short version of `ferry bench scheduler` (the full one: 200 jobs, 4 executors, 5 kills,
// 2 restarts): no job may be lost or come back with other bits than it gives alone.
describe("the scheduler under failure", () => {
  it("loses no job when an executor is SIGKILLed mid-job and the scheduler restarts", async () => {
    const result = await runSchedulerBench({
      jobs: 24,
      executors: 2,
      kills: 1,
      restarts: 1,
      batchSplit: false,
      pipeline: false,
    });
    expect(result.executor_kills).toBe(1);
    expect(result.scheduler_restarts).toBe(1);
    expect(result.lost).toBe(0);
    expect(result.checksum_mismatches).toBe(0);
    expect(result.completed + result.failed).toBe(24);
    // Failures, if any, name a status (none are expected with 6 attempts per job).
    expect(Object.keys(result.failures).every((code) => /^[A-Z_]+$/.test(code))).toBe(true);
    expect(result.batch_split_speedup).toBeNull();
    expect(result.pipeline_speedup).toBeNull();
  }, 180_000);
});
