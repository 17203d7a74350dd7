import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { genModel } from "../lib/model/genModel";
import { loadAddon } from "../lib/native/addon";
import type { NativeDevice, NativeDeviceInfoBase } from "../lib/native/AddonTypes";

// The params backends: `cpu` keeps every segment it read in host memory for later steps and
// jobs; `disk` reads a segment when it is needed and drops it once copied, so a model larger
// than what the host may hold still runs, with the same output.
describe("params backends", () => {
  const addon = loadAddon();
  const job = { batch: 1, tokens: 8, steps: 3, seed: 0 };
  let dir: string;
  let path: string;
  let device: NativeDevice<NativeDeviceInfoBase>;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "ferry-params-"));
    path = join(dir, "model.safetensors");
    await genModel(path, { blocks: 6, hidden: 128, heads: 4, channels: 16 });
    device = new addon.CpuDevice({ capacityBytes: 64 * 1024 * 1024, threads: 2 });
  });
  afterAll(async () => {
    device?.dispose();
    await rm(dir, { recursive: true, force: true });
  });

  async function run(paramsBackend: "cpu" | "disk", load: "lazy" | "background", slots: number) {
    const model = await addon.openModel(path);
    const largest = Math.max(...model.info().baseSegments.map((s) => s.paramBytes));
    const held: number[] = [];
    try {
      const done = addon.startRun(
        device,
        model,
        {
          ...job,
          segments: model.info().baseSegments.map((_, index) => ({
            firstBase: index,
            lastBase: index,
            resident: false,
          })),
          slots,
          paramsBackend,
          load,
        },
        // The params cache's peak during each step, sampled by the run's own thread.
        (report) => held.push(report.hostPeakBytes),
      ).done;
      const { output } = await done;
      return { output, held, after: model.hostCacheBytes(), largest };
    } finally {
      model.dispose();
    }
  }

  it("disk holds at most the segments in flight and gives the cpu backend's output", async () => {
    const kept = await run("cpu", "lazy", 0);
    const total = kept.after;
    expect(total).toBeGreaterThan(5 * kept.largest);
    // The same sampling sees the cpu backend hold the whole model: it would see a disk leak too.
    expect(Math.max(...kept.held)).toBe(total);
    for (const [load, slots] of [
      ["lazy", 0],
      ["background", 2],
    ] as const) {
      const disk = await run("disk", load, slots);
      expect(Buffer.compare(Buffer.from(disk.output.buffer), Buffer.from(kept.output.buffer))).toBe(
        0,
      );
      expect(disk.after).toBe(0);
      // Never more than the staging slots' worth plus one in flight, at any moment of a step.
      for (const bytes of disk.held)
        expect(bytes).toBeLessThanOrEqual((slots + 1) * (kept.largest + 4096));
    }
  });
});
