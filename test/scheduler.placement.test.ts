import { describe, expect, it } from "vitest";
import {
  choosePlacement,
  PREDICTION_SLACK,
  type PlacementCandidate,
} from "../services/scheduler/placement";

const candidate = (
  overrides: Partial<PlacementCandidate> & { id: string },
): PlacementCandidate => ({
  idle: true,
  warm: false,
  availableInS: 0,
  runS: 10,
  coldLoadS: 2,
  ...overrides,
});

// Expectations worked out by hand from placement.ts's rules.
describe("placement", () => {
  it("takes an idle executor where the model is warm, the fastest among several", () => {
    const choice = choosePlacement([
      candidate({ id: "cold-fast", runS: 1 }),
      candidate({ id: "warm-slow", warm: true, runS: 12 }),
      candidate({ id: "warm-fast", warm: true, runS: 8 }),
    ]);
    expect(choice?.id).toBe("warm-fast");
  });

  it("else the earliest predicted finish: queue + cold read + run", () => {
    // a: 0 + 2 + 10 = 12; b: 0 + 2 + 6 = 8; c (busy, warm): 5 + 0 + 6 = 11.
    const choice = choosePlacement([
      candidate({ id: "a" }),
      candidate({ id: "b", runS: 6 }),
      candidate({ id: "c", idle: false, warm: true, availableInS: 5, runS: 6 }),
    ]);
    expect(choice?.id).toBe("b");
  });

  it("waits for a busy executor that finishes well sooner than an idle one", () => {
    // idle: 0 + 2 + 100 = 102; busy: 1 + 0 + 10 = 11, far past the slack.
    const choice = choosePlacement([
      candidate({ id: "idle-slow", runS: 100 }),
      candidate({ id: "busy-fast", idle: false, warm: true, availableInS: 1, runS: 10 }),
    ]);
    expect(choice?.id).toBe("busy-fast");
  });

  it("takes an idle executor within the prediction slack over waiting", () => {
    // busy: 2 + 0 + 8 = 10; idle: 0 + 2 + 10 = 12 ≤ 1.25 × 10.
    expect(12 / 10).toBeLessThanOrEqual(PREDICTION_SLACK);
    const choice = choosePlacement([
      candidate({ id: "busy", idle: false, warm: true, availableInS: 2, runS: 8 }),
      candidate({ id: "idle" }),
    ]);
    expect(choice?.id).toBe("idle");
  });

  it("breaks ties by id, and has no answer without candidates", () => {
    expect(choosePlacement([candidate({ id: "b" }), candidate({ id: "a" })])?.id).toBe("a");
    expect(choosePlacement([])).toBeUndefined();
  });
});
