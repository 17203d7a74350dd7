import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  parseDeviceProfile,
  parseModelProfile,
  parseProfile,
  readProfileFile,
} from "../lib/planner/profileFile";
import { PlanError } from "../lib/planner/types";

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "ferry-planner-profile-"));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

function segment(overrides: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    name: "blocks.0",
    param_bytes: 1000,
    compute_buffer_bytes: 200,
    output_bytes: 30,
    prev_cut_bytes: 30,
    ...overrides,
  };
}

function profile(
  segments: unknown[] = [segment()],
  device: Record<string, unknown> = {},
): Record<string, unknown> {
  return {
    model: { name: "m", segments },
    device: { name: "gpu", total_bytes: 4096, free_bytes: 4000, ...device },
  };
}

describe("parseProfile", () => {
  it("fills optional fields with 0", () => {
    const parsed = parseProfile(profile());
    expect(parsed.model).toEqual({
      name: "m",
      segments: [
        {
          name: "blocks.0",
          param_bytes: 1000,
          compute_buffer_bytes: 200,
          output_bytes: 30,
          prev_cut_bytes: 30,
          external_bytes: 0,
          flops: 0,
        },
      ],
    });
    expect(parsed.device).toEqual({
      name: "gpu",
      total_bytes: 4096,
      free_bytes: 4000,
      h2d_gbps: 0,
      tflops: 0,
      dispatch_us: 0,
    });
    expect(parsed.warnings).toEqual([]);
  });

  it("keeps given optional fields", () => {
    const parsed = parseProfile(
      profile([segment({ external_bytes: 64, flops: 1.5e12 })], {
        h2d_gbps: 24.5,
        tflops: 25,
        dispatch_us: 8,
      }),
    );
    expect(parsed.model!.segments[0].external_bytes).toBe(64);
    expect(parsed.model!.segments[0].flops).toBe(1.5e12);
    expect(parsed.device).toMatchObject({ h2d_gbps: 24.5, tflops: 25, dispatch_us: 8 });
  });

  it.each([
    [
      "a negative size",
      profile([segment(), segment(), segment(), segment({ param_bytes: -5 })]),
      "model.segments[3].param_bytes must be a non-negative number (got -5)",
    ],
    [
      "a string number",
      profile([segment({ output_bytes: "30" })]),
      'model.segments[0].output_bytes must be a non-negative number (got "30")',
    ],
    [
      "a missing required field",
      profile([segment({ prev_cut_bytes: undefined })]),
      "model.segments[0].prev_cut_bytes is missing",
    ],
    [
      "a fractional byte count",
      profile([segment({ compute_buffer_bytes: 1.5 })]),
      "model.segments[0].compute_buffer_bytes must be a whole number of bytes (got 1.5)",
    ],
    [
      "Infinity (JSON 1e999)",
      JSON.parse(
        '{"model":{"name":"m","segments":[]},"device":{"name":"g","total_bytes":1e999,"free_bytes":1}}',
      ),
      "device.total_bytes must be a non-negative number (got Infinity)",
    ],
    [
      "a negative optional field",
      profile([segment({ flops: -1 })]),
      "model.segments[0].flops must be a non-negative number (got -1)",
    ],
    [
      "a nameless segment",
      profile([segment({ name: "" })]),
      'model.segments[0].name must be a non-empty string (got "")',
    ],
    [
      "a segment that is not an object",
      profile([segment(), 7]),
      "model.segments[1] must be an object (got 7)",
    ],
    [
      "segments that are not an array",
      { model: { name: "m", segments: {} }, device: profile().device },
      "model.segments must be an array (got an object)",
    ],
    ["no device", { model: profile().model }, "device is missing"],
    ["no model", { device: profile().device }, "model is missing"],
    [
      "free above total",
      profile([segment()], { free_bytes: 5000 }),
      "device.free_bytes (5000) is more than device.total_bytes (4096)",
    ],
    [
      "a device without memory sizes",
      { model: profile().model, device: { name: "gpu" } },
      "device.total_bytes is missing",
    ],
    ["not an object", [], "the profile must be an object (got an array)"],
  ])("rejects %s", (_, value, message) => {
    expect(() => parseProfile(value)).toThrow(new PlanError(message));
  });

  it("warns about unknown fields instead of taking them as 0", () => {
    const parsed = parseProfile({
      ...profile([segment({ external_byte: 64, _comment: "measured on a 3060" })]),
      $schema: "ferry-profile",
      version: 2,
    });
    expect(parsed.warnings).toEqual([
      "version is not a known field; ignored",
      "model.segments[0].external_byte is not a known field; ignored",
    ]);
  });

  it("may omit the model when the caller allows it", () => {
    expect(
      parseProfile({ device: profile().device }, { modelOptional: true }).model,
    ).toBeUndefined();
  });
});

describe("in-memory checks", () => {
  it("allow fractional estimates but not NaN", () => {
    const model = { name: "m", segments: [segment({ compute_buffer_bytes: 10.5 })] };
    expect(parseModelProfile(model, { wholeBytes: false }).segments[0].compute_buffer_bytes).toBe(
      10.5,
    );
    expect(() =>
      parseModelProfile(
        { name: "m", segments: [segment({ param_bytes: NaN })] },
        { wholeBytes: false },
      ),
    ).toThrow("model.segments[0].param_bytes must be a non-negative number (got NaN)");
    expect(() =>
      parseDeviceProfile({ name: "d", total_bytes: 1, free_bytes: -1 }, { wholeBytes: false }),
    ).toThrow("device.free_bytes must be a non-negative number (got -1)");
  });
});

describe("readProfileFile", () => {
  it("reads the example profiles", async () => {
    const tiny = await readProfileFile(join(__dirname, "fixtures/profiles/tiny-dit.json"));
    expect(tiny.model!.segments.map((s) => s.name)).toEqual([
      "prelude",
      "blocks.0",
      "blocks.1",
      "blocks.2",
      "blocks.3",
      "final",
    ]);
    expect(tiny.device.free_bytes).toBe(2 ** 31);
    expect(tiny.warnings).toEqual([]);
  });

  it("prefixes errors and warnings with the file's path", async () => {
    const path = join(dir, "bad.json");
    await writeFile(path, JSON.stringify(profile([segment({ param_bytes: -1 })])));
    await expect(readProfileFile(path)).rejects.toThrow(
      `${path}: model.segments[0].param_bytes must be a non-negative number (got -1)`,
    );
    const warned = join(dir, "warned.json");
    await writeFile(warned, JSON.stringify({ ...profile(), extra: 1 }));
    expect((await readProfileFile(warned)).warnings).toEqual([
      `${warned}: extra is not a known field; ignored`,
    ]);
  });

  it("says when the file is missing or not JSON", async () => {
    const missing = join(dir, "missing.json");
    await expect(readProfileFile(missing)).rejects.toThrow(
      new PlanError(`cannot read profile ${missing}: no such file`),
    );
    const broken = join(dir, "broken.json");
    await writeFile(broken, "{ not json");
    await expect(readProfileFile(broken)).rejects.toThrow(`${broken} is not valid JSON: `);
  });
});
