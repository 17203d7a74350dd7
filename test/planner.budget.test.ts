import { describe, expect, it } from "vitest";
import { GiB, MiB } from "../lib/config/units";
import { resolveBudget, STREAM_MARGIN_BYTES } from "../lib/planner/budget";
import { PlanError } from "../lib/planner/types";

// Free memory of a 12 GiB card with nothing else on it.
const free = 12 * GiB; // 12884901888
const margin = 512 * MiB; // 536870912

describe("resolveBudget (sd.cpp --max-vram)", () => {
  it("keeps sd.cpp's 512 MiB margin", () => {
    expect(STREAM_MARGIN_BYTES).toBe(536_870_912);
  });

  it("positive x: B = floor(x·2^30); E = min(B, free − 512 MiB) when streaming", () => {
    expect(resolveBudget({ freeBytes: free, maxVramGiB: 10.5, stream: true })).toEqual({
      B: 11_274_289_152,
      E: 11_274_289_152,
      mode: "absolute",
    });
    // floor(1.3 · 2^30) = floor(1395864371.2)
    expect(resolveBudget({ freeBytes: free, maxVramGiB: 1.3, stream: true }).B).toBe(1_395_864_371);
  });

  it("positive x above free memory: E is capped by free − margin, or free without streaming", () => {
    expect(resolveBudget({ freeBytes: free, maxVramGiB: 20, stream: true })).toEqual({
      B: 20 * GiB,
      E: free - margin, // 12348030976
      mode: "absolute",
    });
    expect(resolveBudget({ freeBytes: free, maxVramGiB: 20, stream: false })).toEqual({
      B: 20 * GiB,
      E: free,
      mode: "absolute",
    });
  });

  it("the margin limits E even when B is between free − margin and free", () => {
    // B = 11.75 GiB > free − 0.5 GiB = 11.5 GiB.
    expect(resolveBudget({ freeBytes: free, maxVramGiB: 11.75, stream: true }).E).toBe(
      12_348_030_976,
    );
    expect(resolveBudget({ freeBytes: free, maxVramGiB: 11.75, stream: false }).E).toBe(
      12_616_466_432,
    );
  });

  it("0: no split; B = 0 and E = free, streaming or not (nothing streams: no margin)", () => {
    expect(resolveBudget({ freeBytes: free, maxVramGiB: 0, stream: true })).toEqual({
      B: 0,
      E: free,
      mode: "no-split",
    });
    expect(resolveBudget({ freeBytes: free, maxVramGiB: 0, stream: false })).toEqual({
      B: 0,
      E: free,
      mode: "no-split",
    });
  });

  it("negative −x: B = free − floor(x·2^30)", () => {
    expect(resolveBudget({ freeBytes: free, maxVramGiB: -1, stream: true })).toEqual({
      B: 11 * GiB,
      E: 11 * GiB, // below free − margin
      mode: "free-minus",
    });
    // −1.3: free − 1395864371 = 11489037517
    expect(resolveBudget({ freeBytes: free, maxVramGiB: -1.3, stream: false }).B).toBe(
      11_489_037_517,
    );
    // −0.25: B = free − 256 MiB, above free − 512 MiB, so the margin decides E when streaming.
    expect(resolveBudget({ freeBytes: free, maxVramGiB: -0.25, stream: true })).toEqual({
      B: free - 256 * MiB,
      E: free - margin,
      mode: "free-minus",
    });
    expect(resolveBudget({ freeBytes: free, maxVramGiB: -0.25, stream: false }).E).toBe(
      free - 256 * MiB,
    );
  });

  it("undefined: Ferry's default is the device's free memory", () => {
    expect(resolveBudget({ freeBytes: free, stream: true })).toEqual({
      B: free,
      E: free - margin,
      mode: "free",
    });
    expect(resolveBudget({ freeBytes: free, stream: false })).toEqual({
      B: free,
      E: free,
      mode: "free",
    });
  });

  describe("errors", () => {
    it("a negative limit larger than free memory leaves none", () => {
      expect(() => resolveBudget({ freeBytes: free, maxVramGiB: -20, stream: true })).toThrow(
        new PlanError("--max-vram -20 leaves no memory: free 12.0 GiB − 20.0 GiB"),
      );
      expect(() => resolveBudget({ freeBytes: free, maxVramGiB: -12, stream: false })).toThrow(
        "--max-vram -12 leaves no memory: free 12.0 GiB − 12.0 GiB",
      );
    });

    it("free memory within the streaming margin leaves none", () => {
      expect(() => resolveBudget({ freeBytes: margin, stream: true })).toThrow(
        "the device leaves no memory: free 512.0 MiB is not more than the 512.0 MiB streaming margin",
      );
      // No split streams nothing: a 512 MiB device has a 512 MiB budget (issue 12).
      expect(resolveBudget({ freeBytes: margin, maxVramGiB: 0, stream: true }).E).toBe(margin);
      expect(() => resolveBudget({ freeBytes: 0, maxVramGiB: 0, stream: true })).toThrow(
        "--max-vram 0 leaves no memory: 0 B free",
      );
      // Without streaming there is no margin: one byte above it is a budget.
      expect(resolveBudget({ freeBytes: margin + 1, stream: false }).E).toBe(margin + 1);
    });

    it("a positive limit below one byte", () => {
      expect(() => resolveBudget({ freeBytes: free, maxVramGiB: 1e-10, stream: true })).toThrow(
        "--max-vram 1e-10 is less than one byte",
      );
    });

    it("no free memory at all", () => {
      expect(() => resolveBudget({ freeBytes: 0, stream: false })).toThrow(
        "the device leaves no memory: 0 B free",
      );
    });

    it("non-finite inputs", () => {
      expect(() => resolveBudget({ freeBytes: free, maxVramGiB: NaN, stream: true })).toThrow(
        "--max-vram must be a finite number of GiB (got NaN)",
      );
      expect(() => resolveBudget({ freeBytes: free, maxVramGiB: -Infinity, stream: true })).toThrow(
        PlanError,
      );
      expect(() => resolveBudget({ freeBytes: -1, stream: true })).toThrow(
        "device free memory must be a non-negative number of bytes (got -1)",
      );
    });
  });
});
