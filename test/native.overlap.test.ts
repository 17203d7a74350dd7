import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { genModel } from "../lib/model/genModel";
import { DeviceUnavailableError, loadAddon, mapNativeError } from "../lib/native/addon";
import type {
  NativeAddon,
  NativeDevice,
  NativeDeviceInfoBase,
  NativeModel,
  NativeModelInfo,
  NativePlanSegment,
  NativeRunRequest,
  NativeStepReport,
} from "../lib/native/AddonTypes";

// The overlapped runner through the addon: the same bits for the serial baseline, an all-resident
// plan and every prefetch depth; no device allocation after step 1; resident weights kept across
// jobs (and dropped with their model); the GPU device (ggml's CUDA backend) where there is one.

const addon: NativeAddon = loadAddon();
const hasGpu = addon.gpuDeviceCount() > 0;

type Groups = [number, number, boolean][];

function makePlan(groups: Groups): NativePlanSegment[] {
  return groups.map(([firstBase, lastBase, resident]) => ({ firstBase, lastBase, resident }));
}

const sameBytes = (a: Float32Array, b: Float32Array) =>
  Buffer.compare(
    Buffer.from(a.buffer, a.byteOffset, a.byteLength),
    Buffer.from(b.buffer, b.byteOffset, b.byteLength),
  ) === 0;

async function run(
  device: NativeDevice<NativeDeviceInfoBase>,
  model: NativeModel,
  request: NativeRunRequest,
): Promise<{ output: Float32Array; reports: NativeStepReport[] }> {
  const reports: NativeStepReport[] = [];
  const { output } = await addon.startRun(device, model, request, (r) => reports.push(r)).done;
  return { output, reports };
}

describe("overlapped runs", () => {
  let dir: string;
  let modelPath: string;
  let model: NativeModel;
  let info: NativeModelInfo;
  const batch = 2;
  const tokens = 8;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "ferry-overlap-"));
    modelPath = join(dir, "model.safetensors");
    await genModel(modelPath, {
      blocks: 4,
      hidden: 64,
      heads: 4,
      channels: 8,
      dtype: "bf16",
      seed: 3,
    });
    model = await addon.openModel(modelPath);
    info = model.info();
  });

  afterAll(async () => {
    model?.dispose();
    await rm(dir, { recursive: true, force: true });
  });

  const n = () => info.baseSegments.length;
  const request = (groups: Groups, slots: number, steps = 3): NativeRunRequest => ({
    batch,
    tokens,
    steps,
    seed: 9,
    segments: makePlan(groups),
    slots,
  });
  const perBase = (resident: boolean): Groups =>
    info.baseSegments.map((_, i) => [i, i, resident] as [number, number, boolean]);

  it("gives the same bits for all-resident, serial and every prefetch depth 1..4", async () => {
    const device = new addon.CpuDevice({ capacityBytes: 16 << 20, threads: 2 });
    const reference = await run(device, model, request([[0, n() - 1, true]], 0));
    const plans: Groups[] = [
      perBase(false),
      [
        [0, 1, true],
        [2, 2, false],
        [3, 3, true],
        [4, n() - 1, false],
      ],
      [
        [0, 0, false],
        [1, 2, false],
        [3, 3, true],
        [4, 4, false],
        [5, 5, true],
      ],
    ];
    for (const groups of plans) {
      const serial = await run(device, model, request(groups, 0));
      expect(sameBytes(serial.output, reference.output)).toBe(true);
      const lookahead = await run(device, model, { ...request(groups, 0), execution: "lookahead" });
      expect(sameBytes(lookahead.output, reference.output)).toBe(true);
      for (let slots = 1; slots <= 4; slots++) {
        const overlapped = await run(device, model, request(groups, slots));
        expect(sameBytes(overlapped.output, reference.output)).toBe(true);
        for (const report of overlapped.reports) {
          expect(report.stallUs).toBeGreaterThanOrEqual(0);
          const computes = report.events.filter((e) => e.kind === "compute");
          expect(computes).toHaveLength(groups.length);
          expect(computes.every((e) => typeof e.stallUs === "number")).toBe(true);
        }
      }
    }
    // Everything left on the device is the resident weights kept for later jobs.
    const stats = device.stats();
    expect(stats.inUseBytes).toBe(stats.residentCacheBytes);
    expect(stats.busy).toBe(false);
    device.dispose();
  });

  it("allocates nothing on the device after step 1 of a 10-step run", async () => {
    const device = new addon.CpuDevice({ capacityBytes: 16 << 20, linkGbps: 4, threads: 2 });
    const groups: Groups = [
      [0, 1, true],
      [2, 2, false],
      [3, 3, false],
      [4, n() - 1, false],
    ];
    // Counted by the run's own thread at the end of each step (the reports arrive later).
    const { reports } = await run(device, model, request(groups, 2, 10));
    const allocations = reports.map((r) => r.allocations);
    expect(allocations).toHaveLength(10);
    expect(new Set(allocations).size).toBe(1);
    // The serial baseline allocates per segment per step: the counter would move.
    const serial = await run(device, model, request(groups, 0, 3));
    expect(serial.reports[2]!.allocations).toBeGreaterThan(serial.reports[1]!.allocations);
    device.dispose();
  });

  it("keeps resident weights across jobs, and drops them with the model", async () => {
    const own = await addon.openModel(info.path);
    const device = new addon.CpuDevice({ capacityBytes: 16 << 20, threads: 2 });
    const groups: Groups = [
      [0, 1, true],
      [2, 2, false],
      [3, 3, true],
      [4, n() - 1, false],
    ];
    const first = await run(device, own, request(groups, 2));
    const second = await run(device, own, request(groups, 2));
    expect(sameBytes(first.output, second.output)).toBe(true);
    const residentBytes =
      info.baseSegments[0]!.paramBytes +
      info.baseSegments[1]!.paramBytes +
      info.baseSegments[3]!.paramBytes;
    expect(first.reports[0]!.residentHitBytes).toBe(0);
    expect(second.reports[0]!.residentHitBytes).toBe(residentBytes);
    expect(second.reports[0]!.h2dBytes).toBe(first.reports[0]!.h2dBytes - residentBytes);
    expect(second.reports[0]!.h2dBytes).toBe(second.reports[1]!.h2dBytes);
    expect(device.stats().residentCacheEntries).toBe(3);
    // The cached weights count as available to the next job.
    expect(device.info().freeBytes).toBe(16 << 20);

    own.dispose();
    expect(device.stats()).toMatchObject({ residentCacheBytes: 0, inUseBytes: 0 });
    device.dispose();
  });

  it("runs every load mode and params backend, verified, to the same bits", async () => {
    const device = new addon.CpuDevice({ capacityBytes: 16 << 20, threads: 2 });
    const groups = perBase(false);
    const reference = await run(device, model, request(groups, 0));
    for (const load of ["lazy", "eager", "background"] as const) {
      for (const paramsBackend of ["cpu", "disk"] as const) {
        const fresh = await addon.openModel(info.path);
        const { output } = await run(device, fresh, {
          ...request(groups, 3),
          load,
          paramsBackend,
          verify: true,
        });
        expect(sameBytes(output, reference.output)).toBe(true);
        fresh.dispose();
      }
    }
    device.dispose();
  });

  it("measures the copy rate and refuses bad options", () => {
    const device = new addon.CpuDevice({ capacityBytes: 16 << 20, linkGbps: 2, threads: 1 });
    const rate = device.measureCopyRate(1 << 20);
    expect(rate).toBeGreaterThan(0);
    expect(rate).toBeLessThanOrEqual(2.1);
    expect(device.info().peakCopyGbps).toBe(rate);
    expect(() => device.measureCopyRate(10)).toThrow(/bytes must be a number/);
    expect(() => addon.startRun(device, model, request(perBase(false), 17))).toThrow(
      /slots must be between 0 and 16/,
    );
    expect(() =>
      addon.startRun(device, model, {
        ...request(perBase(false), 1),
        paramsBackend: "tape" as "cpu",
      }),
    ).toThrow(/paramsBackend must be "cpu" or "disk"/);
    expect(() =>
      addon.startRun(device, model, { ...request(perBase(false), 1), load: "later" as "lazy" }),
    ).toThrow(/load must be "lazy", "eager" or "background"/);
    device.dispose();
  });

  describe.skipIf(hasGpu)("without a GPU", () => {
    it("says the GPU device is unavailable and how to build one", () => {
      const error = (() => {
        try {
          new addon.GpuDevice();
        } catch (e) {
          return e as Error;
        }
      })();
      expect(error?.name).toBe("DeviceUnavailableError");
      expect(mapNativeError(error!)).toBeInstanceOf(DeviceUnavailableError);
      expect(error?.message).toMatch(/FERRY_CUDA=1/);
    });
  });

  describe.skipIf(!hasGpu)("on the GPU device", () => {
    it("runs serial and overlapped plans to the CPU's result, within float tolerance", async () => {
      const gpu = new addon.GpuDevice({ capacityBytes: 256 << 20 });
      expect(gpu.info().kind).toBe("gpu");
      const gpuModel = await addon.openModel(modelPath, { device: gpu });
      expect(gpu.measureCopyRate()).toBeGreaterThan(0);
      const cpu = new addon.CpuDevice({ capacityBytes: 16 << 20, threads: 2 });
      const groups: Groups = [
        [0, 1, true],
        [2, 2, false],
        [3, 3, true],
        [4, n() - 1, false],
      ];
      const expected = (await run(cpu, model, request(groups, 0))).output;
      const serial = await run(gpu, gpuModel, request(groups, 0));
      const overlapped = await run(gpu, gpuModel, request(groups, 2, 3));
      expect(new Set(overlapped.reports.map((r) => r.allocations)).size).toBe(1);
      // Different summation orders: close to the CPU, bitwise equal between GPU plans.
      expect(sameBytes(serial.output, overlapped.output)).toBe(true);
      let worst = 0;
      for (let i = 0; i < expected.length; i++) {
        worst = Math.max(worst, Math.abs(serial.output[i]! - expected[i]!));
      }
      expect(worst).toBeLessThan(1e-3);
      gpuModel.dispose();
      cpu.dispose();
      gpu.dispose();
    });
  });
});
