import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { genModel } from "../lib/model/genModel";
import {
  CancelledError,
  InvalidArgumentError,
  loadAddon,
  mapNativeError,
} from "../lib/native/addon";
import type {
  NativeAddon,
  NativeHandoff,
  NativeModel,
  NativePlanSegment,
  NativeRun,
  NativeRunRequest,
} from "../lib/native/AddonTypes";

// Pipeline stages through the addon: two CPU devices in one process each run a range of the
// model's base segments, wired onHandoff → the other's deliver; the last stage's output is
// bitwise the single-device run's. Malformed deliveries and a stage without onHandoff throw
// InvalidArgumentError synchronously; a stage waiting for a handoff stops when cancelled.

const addon: NativeAddon = loadAddon();

const sameBytes = (a: Float32Array, b: Float32Array) =>
  Buffer.compare(
    Buffer.from(a.buffer, a.byteOffset, a.byteLength),
    Buffer.from(b.buffer, b.byteOffset, b.byteLength),
  ) === 0;

const rejection = async (p: Promise<unknown>): Promise<Error> => {
  try {
    await p;
  } catch (e) {
    return e as Error;
  }
  throw new Error("expected a rejection");
};

const thrown = (f: () => unknown): Error => {
  try {
    f();
  } catch (e) {
    return e as Error;
  }
  throw new Error("expected a throw");
};

describe("pipeline stages", () => {
  let dir: string;
  let modelPath: string;
  const models: NativeModel[] = [];
  let n = 0;
  const steps = 3;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "ferry-pipeline-"));
    modelPath = join(dir, "model.safetensors");
    await genModel(modelPath, { blocks: 4, hidden: 64, heads: 4, channels: 8, seed: 5 });
    // One model per stage, as each stage's executor opens its own.
    models.push(await addon.openModel(modelPath), await addon.openModel(modelPath));
    n = models[0].info().baseSegments.length;
  });

  afterAll(async () => {
    for (const m of models) m.dispose();
    await rm(dir, { recursive: true, force: true });
  });

  const perBase = (first: number, last: number): NativePlanSegment[] =>
    Array.from({ length: last - first + 1 }, (_, i) => ({
      firstBase: first + i,
      lastBase: first + i,
      resident: false,
    }));
  const request = (first: number, last: number): NativeRunRequest => ({
    batch: 2,
    tokens: 8,
    steps,
    seed: 9,
    segments: perBase(first, last),
    slots: 2,
  });

  it("gives the single-device run's bits from two stages wired onHandoff → deliver", async () => {
    expect(n).toBe(6);
    const devices = [
      new addon.CpuDevice({ capacityBytes: 16 << 20, threads: 2 }),
      new addon.CpuDevice({ capacityBytes: 16 << 20, threads: 2 }),
    ];
    const reference = await addon.startRun(devices[0], models[0], request(0, n - 1)).done;

    const cut = 2;
    const sent: number[][] = [[], []];
    const names: string[][] = [];
    const stages: NativeRun[] = [];
    const onHandoff = (from: number) => (step: number, tensors: NativeHandoff) => {
      sent[from].push(step);
      names.push(Object.keys(tensors).sort());
      for (const t of Object.values(tensors)) expect(t).toBeInstanceOf(Float32Array);
      stages[1 - from].deliver(step, tensors);
    };
    stages.push(
      addon.startRun(
        devices[0],
        models[0],
        { ...request(0, cut), stage: { firstBase: 0, lastBase: cut } },
        undefined,
        onHandoff(0),
      ),
    );
    const reports: number[] = [];
    stages.push(
      addon.startRun(
        devices[1],
        models[1],
        { ...request(cut + 1, n - 1), stage: { firstBase: cut + 1, lastBase: n - 1 } },
        (r) => reports.push(r.step),
        onHandoff(1),
      ),
    );
    const [, last] = await Promise.all(stages.map((s) => s.done));
    expect(sameBytes(last.output, reference.output)).toBe(true);
    expect(last.shape).toEqual(reference.shape);
    // The first stage hands on steps 1..S, the last hands back 2..S.
    expect(sent).toEqual([
      [1, 2, 3],
      [2, 3],
    ]);
    expect(reports).toEqual([1, 2, 3]);
    expect(names.every((list) => list.includes("z"))).toBe(true);
    // A delivery to a finished run is ignored.
    stages[0].deliver(1, { z: new Float32Array(4) });

    // A stage covering the whole model hands nothing over and needs no onHandoff.
    const whole = await addon.startRun(devices[1], models[1], {
      ...request(0, n - 1),
      stage: { firstBase: 0, lastBase: n - 1 },
    }).done;
    expect(sameBytes(whole.output, reference.output)).toBe(true);
    for (const d of devices) d.dispose();
  });

  it("throws InvalidArgumentError for malformed deliveries and a stage without onHandoff", async () => {
    const device = new addon.CpuDevice({ capacityBytes: 16 << 20, threads: 2 });
    const stageRequest = { ...request(3, n - 1), stage: { firstBase: 3, lastBase: n - 1 } };
    const noHandoff = thrown(() => addon.startRun(device, models[0], stageRequest));
    expect(mapNativeError(noHandoff)).toBeInstanceOf(InvalidArgumentError);
    expect(noHandoff.message).toMatch(/needs onHandoff/);

    const run = addon.startRun(device, models[0], stageRequest, undefined, () => {});
    const wrongType = thrown(() =>
      run.deliver(1, { z: new Float64Array(4) as unknown as Float32Array }),
    );
    expect(mapNativeError(wrongType)).toBeInstanceOf(InvalidArgumentError);
    expect(wrongType.message).toMatch(/tensors\.z must be a Float32Array/);
    const notObject = thrown(() => run.deliver(1, new Float32Array(4) as unknown as NativeHandoff));
    expect(mapNativeError(notObject)).toBeInstanceOf(InvalidArgumentError);
    const badStep = thrown(() => run.deliver(0, {}));
    expect(mapNativeError(badStep)).toBeInstanceOf(InvalidArgumentError);
    expect(badStep.message).toMatch(/step must be an integer ≥ 1/);

    // Nothing valid was delivered: the stage waits for step 1's handoff until cancelled.
    setTimeout(() => run.cancel(), 50);
    const cancelled = await rejection(run.done);
    expect(mapNativeError(cancelled)).toBeInstanceOf(CancelledError);
    expect(cancelled.message).toMatch(
      /cancelled at step 1, waiting for the previous pipeline stage's activations/,
    );
    expect(device.stats().busy).toBe(false);
    device.dispose();
  });

  it("fails a stage run whose handoff does not fit the job", async () => {
    const device = new addon.CpuDevice({ capacityBytes: 16 << 20, threads: 2 });
    const run = addon.startRun(
      device,
      models[0],
      { ...request(3, n - 1), stage: { firstBase: 3, lastBase: n - 1 } },
      undefined,
      () => {},
    );
    run.deliver(1, { z: new Float32Array(3) });
    const error = await rejection(run.done);
    expect(mapNativeError(error)).toBeInstanceOf(InvalidArgumentError);
    expect(error.message).toMatch(/step 1's handoff holds 3 values of "z", expected 128/);
    device.dispose();
  });
});
