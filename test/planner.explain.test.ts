import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { GiB, MiB } from "../lib/config/units";
import type { BaseSegment, DeviceProfile } from "../lib/model/profile";
import { describeBudgetSource, explainPlan } from "../lib/planner/explainPlan";
import { formatPlan } from "../lib/planner/formatPlan";
import { planJob } from "../lib/planner/planJob";
import { readProfileFile } from "../lib/planner/profileFile";

const fixture = join(__dirname, "fixtures/profiles/zimage-rtx3060.json");

function blocks(count: number, bytes: number): BaseSegment[] {
  return Array.from({ length: count }, (_, i) => ({
    name: `blocks.${i}`,
    param_bytes: bytes,
    compute_buffer_bytes: 0,
    output_bytes: 0,
    prev_cut_bytes: 0,
    external_bytes: 0,
    flops: 0,
  }));
}

const gpu = (free: number): DeviceProfile => ({
  name: "gpu",
  total_bytes: free,
  free_bytes: free,
  h2d_gbps: 0,
  tflops: 0,
  dispatch_us: 0,
});

describe("explainPlan", () => {
  it("recomputes the Z-Image facts from the plan alone", async () => {
    const { model, device } = await readProfileFile(fixture);
    const plan = planJob(model!, device, { policy: "sdcpp", stream: true, maxVramGiB: -1 });
    const facts = explainPlan(plan);
    expect(facts).toMatchObject({
      totalParamBytes: 11_700_000_000,
      noSplit: false,
      W: 2_791_777_216,
      reservedBytes: 3_328_648_128,
      residencyLimitBytes: 7_945_641_024,
      residentCount: 6,
      streamedCount: 4,
    });
    expect(facts.cap.applied).toBe(true);
    expect(facts.cap.thresholdBytes).toBe(8_455_716_864); // 0.75 · 11274289152
    expect(facts.cap.reason).toBe(
      "T/4 cap applied: streaming and params 10.9 GiB > 0.75·E = 7.9 GiB, so P = E/4 for " +
        "smaller merged segments and room for residency (sd.cpp PR #1612)",
    );
    expect(facts.residencyReason).toBe(
      "resident prefix stops at segment 6: 6.6 GiB + 1.0 GiB would exceed E − reserved = 7.4 GiB",
    );
  });

  it("says why there is no cap", () => {
    const small = planJob({ name: "m", segments: blocks(4, 100 * MiB) }, gpu(2 * GiB), {
      policy: "sdcpp",
      stream: true,
    });
    expect(explainPlan(small).cap).toMatchObject({ applied: false });
    expect(explainPlan(small).cap.reason).toBe(
      "no cap: params 400.0 MiB ≤ 0.75·E = 1.1 GiB, P = E",
    );
    expect(explainPlan(small).residencyReason).toBe(
      "all parameters fit in E − reserved = 624.0 MiB",
    );

    const unstreamed = planJob({ name: "m", segments: blocks(4, 100 * MiB) }, gpu(2 * GiB), {
      policy: "sdcpp",
      stream: false,
    });
    expect(explainPlan(unstreamed).cap.reason).toMatch(/^no cap: streaming is off/);
    expect(explainPlan(unstreamed).residencyReason).toBe(
      "streaming is off: every segment is resident",
    );
  });

  it("says when the reservation leaves nothing for residency", () => {
    // E = 1 GiB, one 900 MiB segment: W = 900 MiB, reserved = 1412 MiB > E.
    const plan = planJob({ name: "m", segments: blocks(1, 900 * MiB) }, gpu(GiB + 512 * MiB), {
      policy: "sdcpp",
      stream: true,
    });
    expect(explainPlan(plan).residencyReason).toBe(
      "nothing is resident: reserved = 512 MiB + W = 1.4 GiB is more than E = 1.0 GiB",
    );
  });

  it("describes where B came from", () => {
    expect(describeBudgetSource(-1, 12 * GiB)).toBe("--max-vram -1: free 12.0 GiB − 1.0 GiB");
    expect(describeBudgetSource(10.5, 12 * GiB)).toBe("--max-vram 10.5");
    expect(describeBudgetSource(0, 12 * GiB)).toBe("--max-vram 0: no split");
    expect(describeBudgetSource(undefined, 12 * GiB)).toBe(
      "no --max-vram: the device's free memory",
    );
  });
});

describe("formatPlan", () => {
  it("shows budgets, the merged segments with names, residency and the cap", async () => {
    const { model, device } = await readProfileFile(fixture);
    const plan = planJob(model!, device, { policy: "sdcpp", stream: true, maxVramGiB: -1 });
    const text = formatPlan(plan, { modelName: model!.name, device, maxVramGiB: -1 });
    const lines = text.split("\n");
    expect(lines[0]).toBe(
      "Model z-image-like-bf16-1024x688-b2: 32 base segments, 10.9 GiB of parameters",
    );
    expect(lines).toContain("Device RTX 3060 12GB: 11.5 GiB free of 12.0 GiB");
    expect(lines).toContain("Policy sdcpp, streaming on");
    expect(lines).toContain("  B  10.5 GiB  --max-vram -1: free 11.5 GiB − 1.0 GiB");
    expect(lines).toContain("  E  10.5 GiB  min(B, free − 512.0 MiB margin)");
    expect(text).toMatch(/ {2}P {3}2\.6 GiB {2}T\/4 cap applied/);
    expect(lines).toContain("Merged segments (10)");
    expect(lines).toContain("  0    0-3  prelude .. blocks.2     1.4 GiB  1.1 GiB  resident");
    expect(lines).toContain("  9  28-31  blocks.27 .. final      1.1 GiB  1.1 GiB  streamed");
    expect(lines).toContain(
      "Resident: 6.6 GiB in 6 segment(s); streamed per step: 4.3 GiB in 4 segment(s)",
    );
    expect(text.endsWith("\n")).toBe(true);
  });

  it("works on a plan alone (e.g. one received from the scheduler)", () => {
    const plan = planJob({ name: "m", segments: blocks(2, MiB) }, gpu(GiB), {
      policy: "sdcpp",
      stream: false,
      maxVramGiB: 0,
    });
    const text = formatPlan(plan);
    expect(text).toContain("  B      0 B  no split (--max-vram 0)");
    expect(text).toContain("  E  1.0 GiB  free (no split: nothing streams, so no margin)");
    expect(text).toContain("  0   0-1  blocks.0 .. blocks.1  2.0 MiB      0 B  resident");
    expect(text).toContain("Residency: no split: the whole model is one resident segment");
  });
});
