import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { genModel } from "../lib/model/genModel";
import {
  DeviceUnavailableError,
  loadAddon,
  mapNativeError,
} from "../services/executor/native/addon";
import type {
  NativeAddon,
  NativeDevice,
  NativeDeviceInfoBase,
  NativeModel,
  NativeModelInfo,
  NativePlanSegment,
  NativeRunRequest,
  NativeStepReport,
} from "../services/executor/native/AddonTypes";

// The overlapped runner through the addon: the same bits for the serial baseline, an all-resident
// plan and every prefetch depth; no device allocation after step 1; resident weights kept across
// jobs (and dropped with their model); the CUDA device where there is a GPU.

const addon: NativeAddon = loadAddon();
const hasCuda = addon.cudaAvailable();

type Groups = [number, number, boolean][];

function makePlan(
  info: NativeModelInfo,
  batch: number,
  tokens: number,
  groups: Groups,
): NativePlanSegment[] {
  const dims = { ...info.dims, batch, tokens };
  return groups.map(([firstBase, lastBase, resident]) => {
    let computeBufferBytes = 0;
    for (let b = firstBase; b <= lastBase; b++) {
      const name = info.baseSegments[b]!.name;
      const kind = name === "prelude" ? "prelude" : name === "final" ? "final" : "block";
      computeBufferBytes = Math.max(computeBufferBytes, addon.scratchBytes(kind, dims));
    }
    return { firstBase, lastBase, resident, computeBufferBytes };
  });
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
  let model: NativeModel;
  let info: NativeModelInfo;
  const batch = 2;
  const tokens = 8;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "ferry-overlap-"));
    const path = join(dir, "model.safetensors");
    await genModel(path, { blocks: 4, hidden: 64, heads: 4, channels: 8, dtype: "bf16", seed: 3 });
    model = await addon.openModel(path);
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
    segments: makePlan(info, batch, tokens, groups),
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
    const allocations: number[] = [];
    const groups: Groups = [
      [0, 1, true],
      [2, 2, false],
      [3, 3, false],
      [4, n() - 1, false],
    ];
    await addon.startRun(device, model, request(groups, 2, 10), () =>
      allocations.push(device.stats().allocations),
    ).done;
    expect(allocations).toHaveLength(10);
    expect(new Set(allocations).size).toBe(1);
    expect(device.stats().allocations).toBe(allocations[0]);
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

  describe.skipIf(hasCuda)("without a GPU", () => {
    it("says the CUDA device is unavailable", () => {
      const error = (() => {
        try {
          new addon.CudaDevice();
        } catch (e) {
          return e as Error;
        }
      })();
      expect(error?.name).toBe("DeviceUnavailableError");
      expect(mapNativeError(error!)).toBeInstanceOf(DeviceUnavailableError);
      expect(error?.message).toMatch(/cuda/i);
    });
  });

  describe.skipIf(!hasCuda)("on the CUDA device", () => {
    it("runs serial and overlapped plans to the CPU's result, within float tolerance", async () => {
      const gpu = new addon.CudaDevice({ capacityBytes: 256 << 20 });
      expect(gpu.info().kind).toBe("cuda");
      expect(gpu.measureCopyRate()).toBeGreaterThan(0);
      const cpu = new addon.CpuDevice({ capacityBytes: 16 << 20, threads: 2 });
      const groups: Groups = [
        [0, 1, true],
        [2, 2, false],
        [3, 3, true],
        [4, n() - 1, false],
      ];
      const expected = (await run(cpu, model, request(groups, 0))).output;
      const serial = await run(gpu, model, request(groups, 0));
      const allocations: number[] = [];
      const overlapped = await addon.startRun(gpu, model, request(groups, 2, 3), () =>
        allocations.push(gpu.stats().allocations),
      ).done;
      expect(new Set(allocations).size).toBe(1);
      // Different summation orders: close to the CPU, bitwise equal between GPU plans.
      expect(sameBytes(serial.output, overlapped.output)).toBe(true);
      let worst = 0;
      for (let i = 0; i < expected.length; i++) {
        worst = Math.max(worst, Math.abs(serial.output[i]! - expected[i]!));
      }
      expect(worst).toBeLessThan(1e-3);
      cpu.dispose();
      gpu.dispose();
    });
  });
});
