import { mkdtemp, open, rm, stat, truncate, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ferryVersion } from "../lib/packageInfo";
import {
  CancelledError,
  DeviceBusyError,
  DeviceOutOfMemoryError,
  InvalidArgumentError,
  IoError,
  loadAddon,
  mapNativeError,
  ModelFormatError,
} from "../lib/native/addon";
import type {
  NativeModel,
  NativeModelInfo,
  NativePlanSegment,
  NativeRunRequest,
  NativeStepReport,
} from "../lib/native/AddonTypes";

// The addon loaded for real, on real files: plans agree bit for bit, the device is left empty,
// errors arrive typed, and a run never blocks the event loop.

interface DitShape {
  hidden: number;
  heads: number;
  channels: number;
  blocks: number;
}

/** Writes a Ferry DiT safetensors file with small random F32 weights (a local writer on purpose). */
async function writeDit(path: string, dit: DitShape, seed = 1): Promise<number> {
  const { hidden: d, channels: c } = dit;
  const specs: [string, number[]][] = [
    ["embed.weight", [d, c]],
    ["embed.bias", [d]],
  ];
  for (let i = 0; i < dit.blocks; i++) {
    const p = `blocks.${i}.`;
    specs.push(
      [`${p}norm1.weight`, [d]],
      [`${p}attn.qkv.weight`, [3 * d, d]],
      [`${p}attn.qkv.bias`, [3 * d]],
      [`${p}attn.out.weight`, [d, d]],
      [`${p}attn.out.bias`, [d]],
      [`${p}norm2.weight`, [d]],
      [`${p}mlp.fc1.weight`, [4 * d, d]],
      [`${p}mlp.fc1.bias`, [4 * d]],
      [`${p}mlp.fc2.weight`, [d, 4 * d]],
      [`${p}mlp.fc2.bias`, [d]],
    );
  }
  specs.push(["final.norm.weight", [d]], ["final.out.weight", [c, d]], ["final.out.bias", [c]]);

  let state = seed >>> 0 || 1;
  const uniform = () => {
    // xorshift32, in [-1, 1)
    state ^= state << 13;
    state >>>= 0;
    state ^= state >>> 17;
    state ^= state << 5;
    state >>>= 0;
    return state / 2 ** 31 - 1;
  };
  const header: Record<string, unknown> = {
    __metadata__: {
      "ferry.arch": "dit",
      "ferry.hidden": String(d),
      "ferry.heads": String(dit.heads),
      "ferry.channels": String(c),
      "ferry.blocks": String(dit.blocks),
    },
  };
  const chunks: Buffer[] = [];
  let offset = 0;
  for (const [name, shape] of specs) {
    const n = shape.reduce((a, b) => a * b, 1);
    const values = new Float32Array(n);
    const isNorm = name.includes("norm");
    const scale = shape.length === 2 ? 1 / Math.sqrt(shape[1]!) : 0.1;
    for (let i = 0; i < n; i++) values[i] = (isNorm ? 1 : 0) + scale * uniform();
    const bytes = Buffer.from(values.buffer);
    header[name] = { dtype: "F32", shape, data_offsets: [offset, offset + bytes.length] };
    chunks.push(bytes);
    offset += bytes.length;
  }
  let text = JSON.stringify(header);
  text += " ".repeat((8 - ((8 + text.length) % 8)) % 8);
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(text.length));
  const file = await open(path, "w");
  try {
    await file.write(length);
    await file.write(Buffer.from(text, "utf8"));
    for (const chunk of chunks) await file.write(chunk);
  } finally {
    await file.close();
  }
  return offset;
}

/** Plans over the model's base segments from [first, last, resident] groups. */
function makePlan(groups: [number, number, boolean][]): NativePlanSegment[] {
  return groups.map(([firstBase, lastBase, resident]) => ({ firstBase, lastBase, resident }));
}

const perBase = (info: NativeModelInfo, resident: boolean): [number, number, boolean][] =>
  info.baseSegments.map((_, i) => [i, i, resident]);
const whole = (info: NativeModelInfo, resident: boolean): [number, number, boolean][] => [
  [0, info.baseSegments.length - 1, resident],
];

/** The job's initial latent, as lib/model/initialInput.ts defines it (BigInt SplitMix64). */
function initialLatent(n: number, seed: bigint): Float32Array {
  const mask = (1n << 64n) - 1n;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    let z = (seed + BigInt(i) + 0x9e3779b97f4a7c15n) & mask;
    z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & mask;
    z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & mask;
    z ^= z >> 31n;
    out[i] = (Number(z >> 40n) / 2 ** 24) * 2 - 1;
  }
  return out;
}

async function rejection(promise: Promise<unknown>): Promise<Error> {
  const error = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(Error);
  return error as Error;
}

const sameBytes = (a: Float32Array, b: Float32Array) =>
  Buffer.compare(
    Buffer.from(a.buffer, a.byteOffset, a.byteLength),
    Buffer.from(b.buffer, b.byteOffset, b.byteLength),
  ) === 0;

describe("native addon", () => {
  const addon = loadAddon();
  const tiny: DitShape = { hidden: 32, heads: 4, channels: 8, blocks: 3 };
  let dir: string;
  let tinyPath: string;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "ferry-addon-"));
    tinyPath = join(dir, "tiny.safetensors");
    await writeDit(tinyPath, tiny);
  });

  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it("reports its version and device", () => {
    expect(addon.version()).toBe(ferryVersion());
    const device = new addon.CpuDevice({ capacityBytes: 1 << 20, linkGbps: 8, threads: 2 });
    expect(device.info()).toEqual({
      name: "cpu",
      kind: "cpu",
      backend: "CPU",
      totalBytes: 1 << 20,
      freeBytes: 1 << 20,
      linkGbps: 8,
      threads: 2,
      peakCopyGbps: 0,
      budgetBytes: 1 << 20,
      runningJobs: 0,
    });
    expect(device.stats()).toMatchObject({
      allocations: 0,
      inUseBytes: 0,
      peakBytes: 0,
      busy: false,
      budgetBytes: 1 << 20,
    });
    // A lower budget is refused past (and reported); out of range is an InvalidArgumentError.
    expect(device.setBudget(1 << 19)).toEqual({
      budgetBytes: 1 << 19,
      inUseBytes: 0,
      evictedBytes: 0,
      overBytes: 0,
    });
    expect(device.info()).toMatchObject({ budgetBytes: 1 << 19, freeBytes: 1 << 19 });
    expect(() => device.setBudget(0)).toThrow(/bytes must be a number ≥ 1/);
    expect(() => device.setBudget((1 << 20) + 4096)).toThrow(/between 1 byte and/);
    device.dispose();
    device.dispose();
    const error = (() => {
      try {
        device.info();
      } catch (e) {
        return e as Error;
      }
    })();
    expect(error?.name).toBe("InvalidArgumentError");
    expect(() => new addon.CpuDevice({ capacityBytes: -1 })).toThrow(/capacityBytes/);
    expect(
      () => new addon.CpuDevice({ capacityBytes: 1 << 20, commitMemory: "yes" as never }),
    ).toThrow(/commitMemory must be a boolean/);
  });

  it("commits a device's memory at start-up when asked, and computes the same there", async () => {
    const model = await addon.openModel(tinyPath);
    const info = model.info();
    const outputs: Float32Array[] = [];
    for (const commitMemory of [false, true]) {
      const device = new addon.CpuDevice({ capacityBytes: 8 << 20, commitMemory });
      const result = await addon.startRun(device, model, {
        batch: 1,
        tokens: 4,
        steps: 2,
        seed: 3,
        segments: makePlan(perBase(info, false)),
      }).done;
      outputs.push(result.output);
      expect(device.stats().inUseBytes).toBe(0);
      device.dispose();
    }
    expect(sameBytes(outputs[0]!, outputs[1]!)).toBe(true);
    model.dispose();
  });

  it("reports reads ahead of use as read events of step 1, and none when loading lazily", async () => {
    const readsOf = async (load: "eager" | "background" | "lazy") => {
      const model = await addon.openModel(tinyPath);
      const info = model.info();
      const device = new addon.CpuDevice({ capacityBytes: 8 << 20 });
      const reports: NativeStepReport[] = [];
      await addon.startRun(
        device,
        model,
        {
          batch: 1,
          tokens: 4,
          steps: 2,
          seed: 5,
          load,
          paramsBackend: "cpu",
          segments: makePlan([
            [0, 1, false],
            [2, info.baseSegments.length - 1, false],
          ]),
        },
        (r) => reports.push(r),
      ).done;
      device.dispose();
      model.dispose();
      return { info, reports };
    };

    const eager = await readsOf("eager");
    const paramBytes = eager.info.baseSegments.reduce((sum, s) => sum + s.paramBytes, 0);
    const reads = eager.reports[0]!.events.filter((e) => e.kind === "read");
    // Every base segment was read before step 1 asked for it: step 1 read nothing itself.
    expect(reads).toHaveLength(eager.info.baseSegments.length);
    expect(reads.reduce((sum, e) => sum + e.bytes, 0)).toBe(paramBytes);
    expect(eager.reports[0]!.diskBytes).toBe(0);
    for (const read of reads) {
      expect(read).toMatchObject({ source: "disk", cold: true });
      expect(read.endUs).toBeGreaterThanOrEqual(read.startUs);
      expect(read.endUs).toBeLessThanOrEqual(eager.reports[0]!.stepStartUs + 1);
    }
    // Base segments 0 and 1 are merged segment 0; the rest merged segment 1.
    expect(reads.map((e) => e.segment).sort()).toEqual(
      eager.info.baseSegments.map((_, b) => (b <= 1 ? 0 : 1)).sort(),
    );
    expect(eager.reports[1]!.events.some((e) => e.kind === "read")).toBe(false);

    // In the background, each base segment is read once, either ahead of use (a read event) or
    // while a prepare_params waited for it (that event's bytes, the step's diskBytes).
    const background = await readsOf("background");
    const first = background.reports[0]!;
    const sumOf = (kind: string, cold?: boolean) =>
      first.events
        .filter((e) => e.kind === kind && (cold === undefined || e.cold === cold))
        .reduce((sum, e) => sum + e.bytes, 0);
    expect(sumOf("prepare_params", true)).toBe(first.diskBytes);
    expect(sumOf("read") + sumOf("prepare_params", true)).toBe(paramBytes);

    // Lazily, step 1's prepare_params read everything itself (cold, from disk): no read events.
    const lazy = await readsOf("lazy");
    expect(lazy.reports.flatMap((r) => r.events).some((e) => e.kind === "read")).toBe(false);
    expect(lazy.reports[0]!.diskBytes).toBe(paramBytes);
  });

  it("opens a model and describes it", async () => {
    const model = await addon.openModel(tinyPath);
    const info = model.info();
    expect(info.path).toBe(tinyPath);
    expect(info.format).toBe("safetensors");
    expect(info.metadata["ferry.arch"]).toBe("dit");
    expect(info.arch).toBe("ferry-dit");
    expect(info.config).toEqual(tiny);
    expect(info.baseSegments.map((s) => s.kind)).toEqual([
      "prelude",
      "block",
      "block",
      "block",
      "final",
    ]);
    expect(info.baseSegments.map((s) => s.name)).toEqual([
      "prelude",
      "blocks.0",
      "blocks.1",
      "blocks.2",
      "final",
    ]);
    expect(info.tensors).toHaveLength(2 + 10 * 3 + 3);
    const qkv = info.tensors.find((t) => t.name === "blocks.1.attn.qkv.weight")!;
    expect(qkv).toMatchObject({ dtype: "F32", shape: [96, 32], bytes: 96 * 32 * 4 });
    const total = info.tensors.reduce((sum, t) => sum + t.bytes, 0);
    expect(info.baseSegments.reduce((sum, s) => sum + s.paramBytes, 0)).toBe(total);
    expect(info.baseSegments[1]!.tensorNames).toContain("blocks.0.mlp.fc2.bias");
    expect(model.hostCacheBytes()).toBe(0);
    model.dispose();
    expect(() => model.info()).toThrow(/disposed/);
  });

  it("gives identical output for different plans and leaves the device empty", async () => {
    const model = await addon.openModel(tinyPath);
    const info = model.info();
    const device = new addon.CpuDevice({ capacityBytes: 8 << 20, threads: 2 });
    const request = (groups: [number, number, boolean][]): NativeRunRequest => ({
      batch: 2,
      tokens: 6,
      steps: 2,
      seed: 11,
      segments: makePlan(groups),
    });

    const reports: NativeStepReport[] = [];
    const streamed = addon.startRun(device, model, request(perBase(info, false)), (r) =>
      reports.push(r),
    );
    const first = await streamed.done;
    expect(first.shape).toEqual([2, 6, 8]);
    expect(first.output).toBeInstanceOf(Float32Array);
    expect(first.output).toHaveLength(2 * 6 * 8);
    expect(Array.from(first.output).every(Number.isFinite)).toBe(true);

    const afterFirst = device.stats();
    expect(afterFirst.allocations).toBeGreaterThan(3);
    expect(afterFirst.inUseBytes).toBe(0);
    expect(afterFirst.busy).toBe(false);
    expect(model.hostCacheBytes()).toBeGreaterThanOrEqual(
      info.baseSegments.reduce((sum, s) => sum + s.paramBytes, 0),
    );

    // Step reports: the first step reads everything from disk, the second from the host cache.
    expect(reports.map((r) => r.step)).toEqual([1, 2]);
    const paramBytes = info.baseSegments.reduce((sum, s) => sum + s.paramBytes, 0);
    expect(reports[0]!.diskBytes).toBe(paramBytes);
    expect(reports[1]!.diskBytes).toBe(0);
    expect(reports.every((r) => r.h2dBytes === paramBytes)).toBe(true);
    expect(reports[0]!.stepStartUs).toBeLessThanOrEqual(reports[0]!.stepEndUs);
    expect(Math.abs(reports[0]!.stepStartUs / 1000 - Date.now())).toBeLessThan(3_600_000);
    for (const [step, report] of reports.entries()) {
      const kinds = (k: string) => report.events.filter((e) => e.kind === k);
      expect(kinds("segment")).toHaveLength(5);
      expect(kinds("prepare_params")).toHaveLength(5);
      expect(kinds("h2d")).toHaveLength(5);
      expect(kinds("compute")).toHaveLength(5);
      for (const e of kinds("prepare_params")) {
        expect(e).toMatchObject({ source: step === 0 ? "disk" : "host", cold: step === 0 });
      }
    }

    const resident = await addon.startRun(device, model, request(whole(info, true))).done;
    expect(sameBytes(resident.output, first.output)).toBe(true);
    const mixed = await addon.startRun(
      device,
      model,
      request([
        [0, 1, true],
        [2, 2, false],
        [3, 4, true],
      ]),
    ).done;
    expect(sameBytes(mixed.output, first.output)).toBe(true);
    expect(device.stats().inUseBytes).toBe(0);
    expect(device.stats().allocations).toBeGreaterThan(afterFirst.allocations);

    // The latent generated natively from the seed is the one TypeScript defines.
    const explicit = await addon.startRun(device, model, {
      ...request(perBase(info, false)),
      seed: 0,
      inputs: { z: initialLatent(2 * 6 * 8, 11n) },
    }).done;
    expect(sameBytes(explicit.output, first.output)).toBe(true);
    const bigSeed = await addon.startRun(device, model, {
      ...request(perBase(info, false)),
      seed: 11n,
    }).done;
    expect(sameBytes(bigSeed.output, first.output)).toBe(true);

    model.dispose();
    device.dispose();
  });

  it("rejects a job that does not fit with DeviceOutOfMemoryError, leaving the device empty", async () => {
    const model = await addon.openModel(tinyPath);
    const info = model.info();
    const device = new addon.CpuDevice({ capacityBytes: 64 * 1024, threads: 1 });
    const run = addon.startRun(device, model, {
      batch: 2,
      tokens: 6,
      steps: 2,
      seed: 0,
      segments: makePlan(whole(info, true)),
    });
    const error = await rejection(run.done);
    expect(error.name).toBe("DeviceOutOfMemoryError");
    expect(error.message).toMatch(/out of device memory: requested \d+ bytes/);
    expect(mapNativeError(error)).toBeInstanceOf(DeviceOutOfMemoryError);
    expect(device.stats()).toMatchObject({ inUseBytes: 0, busy: false });
    model.dispose();
    device.dispose();
  });

  it("rejects corrupt and missing files with typed errors", async () => {
    const corrupt = join(dir, "corrupt.safetensors");
    await writeDit(corrupt, tiny);
    // Cut into the tensor data: the header still names bytes that are gone.
    await truncate(corrupt, (await stat(corrupt)).size - 1000);
    const error = await rejection(addon.openModel(corrupt));
    expect(error.name).toBe("ModelFormatError");
    expect(error.message).toContain(corrupt);
    expect(error.message).toMatch(/run past the end of the data/);
    expect(mapNativeError(error)).toBeInstanceOf(ModelFormatError);

    const notJson = join(dir, "garbage.safetensors");
    await writeFile(
      notJson,
      Buffer.concat([Buffer.from([4, 0, 0, 0, 0, 0, 0, 0]), Buffer.from("{oops")]),
    );
    expect((await rejection(addon.openModel(notJson))).message).toMatch(/not valid JSON/);

    const missing = await rejection(addon.openModel(join(dir, "missing.safetensors")));
    expect(missing.name).toBe("IoError");
    const mapped = mapNativeError(missing);
    expect(mapped).toBeInstanceOf(IoError);
    expect(mapped).toMatchObject({ code: "ENOENT", syscall: "open" });
  });

  it("refuses bad requests and plans", async () => {
    const model = await addon.openModel(tinyPath);
    const info = model.info();
    const device = new addon.CpuDevice({ capacityBytes: 8 << 20, threads: 1 });
    const base = {
      batch: 1,
      tokens: 4,
      steps: 1,
      seed: 0,
      segments: makePlan(perBase(info, false)),
    };
    const gap = await rejection(
      addon.startRun(device, model, { ...base, segments: base.segments.filter((_, i) => i !== 2) })
        .done,
    );
    expect(mapNativeError(gap)).toBeInstanceOf(InvalidArgumentError);
    expect(gap.message).toMatch(
      /plan segment 2 covers base segments 3..3; segments must cover 0..4 in order/,
    );
    expect(() =>
      addon.startRun(device, model, { ...base, batch: "two" } as unknown as NativeRunRequest),
    ).toThrow(/batch must be a number/);
    expect(() => addon.startRun(model as never, model, base)).toThrow(/CpuDevice/);
    expect(device.stats()).toMatchObject({ allocations: 0, busy: false });
    model.dispose();
    device.dispose();
  });

  describe("on a ~20 MB model", () => {
    const big: DitShape = { hidden: 256, heads: 8, channels: 16, blocks: 6 };
    let bigPath: string;
    let model: NativeModel;
    let info: NativeModelInfo;

    beforeAll(async () => {
      bigPath = join(dir, "big.safetensors");
      const bytes = await writeDit(bigPath, big, 3);
      expect(bytes).toBeGreaterThan(18e6);
      model = await addon.openModel(bigPath);
      info = model.info();
    }, 60_000);

    afterAll(() => model?.dispose());

    const request = (steps: number): NativeRunRequest => ({
      batch: 2,
      tokens: 32,
      steps,
      seed: 5,
      segments: makePlan(perBase(info, false)),
    });

    it("keeps the event loop turning while it runs", async () => {
      // A paced 2 GB/s link makes each step take ≥ 10 ms by construction, however fast the host.
      const device = new addon.CpuDevice({ capacityBytes: 64 << 20, linkGbps: 2, threads: 2 });
      let ticks = 0;
      const timer = setInterval(() => ticks++, 1);
      try {
        const run = addon.startRun(device, model, request(8));
        // startRun returned while the job is still running on its own thread.
        expect(device.stats().busy).toBe(true);
        const out = await run.done;
        expect(out.shape).toEqual([2, 32, 16]);
      } finally {
        clearInterval(timer);
      }
      expect(ticks).toBeGreaterThan(0);
      expect(device.stats()).toMatchObject({ inUseBytes: 0, busy: false });
      device.dispose();
    }, 120_000);

    it("runs several jobs on one device, refuses what needs it idle meanwhile, and cancels", async () => {
      const device = new addon.CpuDevice({ capacityBytes: 64 << 20, linkGbps: 2, threads: 2 });
      const alone = await addon.startRun(device, model, request(1)).done;
      let steps = 0;
      let busy: unknown;
      const first = addon.startRun(device, model, request(50), () => {
        steps++;
        if (steps === 1) {
          // The copy-rate measurement needs the device free of jobs.
          try {
            device.measureCopyRate();
          } catch (error) {
            busy = error;
          }
        }
        first.cancel();
      });
      const firstDone = rejection(first.done);
      // A second job shares the device, with the output it has alone.
      const second = await addon.startRun(device, model, request(1)).done;
      expect(Buffer.from(second.output.buffer).equals(Buffer.from(alone.output.buffer))).toBe(true);

      const cancelled = await firstDone;
      expect((busy as Error).name).toBe("DeviceBusyError");
      expect(mapNativeError(busy)).toBeInstanceOf(DeviceBusyError);
      expect(cancelled.name).toBe("CancelledError");
      expect(mapNativeError(cancelled)).toBeInstanceOf(CancelledError);
      // Cancelled at a segment boundary soon after the first report (how soon is not asserted).
      expect(steps).toBeGreaterThanOrEqual(1);
      expect(steps).toBeLessThan(50);
      expect(device.stats()).toMatchObject({ inUseBytes: 0, busy: false });

      // The device is free again, and an onStep that throws ends the run with its error.
      const failing = addon.startRun(device, model, request(3), () => {
        throw new RangeError("listener failed");
      });
      const thrown = await rejection(failing.done);
      expect(thrown).toBeInstanceOf(RangeError);
      expect(thrown.message).toBe("listener failed");
      expect(device.stats()).toMatchObject({ inUseBytes: 0, busy: false });
      device.dispose();
    }, 120_000);

    it("survives dispose of its device and model mid-run", async () => {
      const device = new addon.CpuDevice({ capacityBytes: 64 << 20, threads: 2 });
      const own = await addon.openModel(bigPath);
      const run = addon.startRun(device, own, request(2));
      device.dispose();
      own.dispose();
      const out = await run.done;
      expect(out.output).toHaveLength(2 * 32 * 16);
      expect(() => device.stats()).toThrow(/disposed/);
    }, 120_000);
  });
});
