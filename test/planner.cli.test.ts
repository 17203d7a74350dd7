import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Command } from "commander";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { register, runPlanCommand, type PlanCommandIo } from "../cli/commands/plan";
import { GiB, MiB } from "../lib/config/units";
import { genModel } from "../lib/model/genModel";
import { modelProfileFromFile } from "../lib/model/segments";
import { planJob } from "../lib/planner/planJob";
import { planToJson } from "../lib/planner/planJson";
import { readProfileFile } from "../lib/planner/profileFile";

const tiny = join(__dirname, "fixtures/profiles/tiny-dit.json");
const zimage = join(__dirname, "fixtures/profiles/zimage-rtx3060.json");

let dir: string;
let modelPath: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "ferry-plan-cli-"));
  modelPath = join(dir, "dit.safetensors");
  await genModel(modelPath, { blocks: 3, hidden: 64, heads: 4, channels: 8 });
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

async function plan(...args: string[]): Promise<Run> {
  const run = { code: 0, stdout: "", stderr: "" };
  const io: PlanCommandIo = {
    stdout: (text) => void (run.stdout += text),
    stderr: (text) => void (run.stderr += text),
  };
  run.code = await runPlanCommand(args, io);
  return run;
}

async function planJson(...args: string[]): Promise<ReturnType<typeof planToJson>> {
  const run = await plan(...args, "--json");
  expect(run.stderr).toBe("");
  expect(run.code).toBe(0);
  return JSON.parse(run.stdout) as ReturnType<typeof planToJson>;
}

describe("ferry plan --profile", () => {
  it("--json prints planToJson of the profile's plan", async () => {
    const { model, device } = await readProfileFile(tiny);
    const expected = planToJson(planJob(model!, device, { policy: "sdcpp", stream: true }));
    expect(await planJson("--profile", tiny)).toEqual(expected);
  });

  it.each([
    [["--max-vram", "-1", "--profile", zimage]],
    [["--profile", zimage, "--max-vram", "-1"]],
    [["--profile", zimage, "--max-vram=-1"]],
    [["--profile", zimage, "--max-vram", "-1.0"]],
  ])("accepts a negative --max-vram: %j", async (args) => {
    const json = await planJson(...args);
    // free 11.5 GiB − 1 GiB
    expect(json.budget).toEqual({ B: 11_274_289_152, E: 11_274_289_152, P: 2_818_572_288 });
    expect(json.segments).toHaveLength(10);
  });

  it("takes positive and zero --max-vram", async () => {
    expect((await planJson("--profile", tiny, "--max-vram", "0.5")).budget).toEqual({
      B: 512 * MiB,
      E: 512 * MiB,
      P: 512 * MiB,
    });
    const noSplit = await planJson("--profile", tiny, "--max-vram", "0");
    // No split streams nothing, so the 512 MiB streaming margin does not apply (issue 12).
    expect(noSplit.budget).toEqual({ B: 0, E: 2048 * MiB, P: 2048 * MiB });
    expect(noSplit.segments.map((s) => s.base)).toEqual([[0, 5]]);
  });

  it("--no-stream plans without streaming", async () => {
    const json = await planJson("--profile", tiny, "--no-stream");
    expect(json.stream).toBe(false);
    expect(json.budget.E).toBe(2 * GiB);
    expect(json.segments.every((s) => s.resident)).toBe(true);
  });

  it("--device-memory replaces the profile's memory", async () => {
    const json = await planJson("--profile", tiny, "--device-memory", "1GiB");
    expect(json.budget).toEqual({ B: GiB, E: 512 * MiB, P: 512 * MiB });
  });

  it("prints a readable plan by default", async () => {
    const run = await plan("--profile", zimage, "--max-vram", "-1");
    expect(run.code).toBe(0);
    expect(run.stderr).toBe("");
    expect(run.stdout).toContain("Device RTX 3060 12GB: 11.5 GiB free of 12.0 GiB");
    expect(run.stdout).toContain("  B  10.5 GiB  --max-vram -1: free 11.5 GiB − 1.0 GiB");
    expect(run.stdout).toContain("T/4 cap applied");
    expect(run.stdout).toContain("  0    0-3  prelude .. blocks.2     1.4 GiB  1.1 GiB  resident");
    expect(run.stdout).toContain(
      "Resident: 6.6 GiB in 6 segment(s); streamed per step: 4.3 GiB in 4 segment(s)",
    );
  });

  it("warns about unknown profile fields on stderr and still plans", async () => {
    const path = join(dir, "typo.json");
    const profile = JSON.parse(await readFile(tiny, "utf8")) as {
      model: { segments: Array<Record<string, unknown>> };
    };
    profile.model.segments[0].external_byte = 5;
    await writeFile(path, JSON.stringify(profile));
    const run = await plan("--profile", path, "--json");
    expect(run.code).toBe(0);
    expect(run.stderr).toBe(
      `ferry plan: warning: ${path}: model.segments[0].external_byte is not a known field; ignored\n`,
    );
  });
});

describe("ferry plan MODEL", () => {
  it("plans a model file's header on --device-memory with batch 1 and 64 tokens by default", async () => {
    const model = await modelProfileFromFile(modelPath, { batch: 1, tokens: 64 });
    const device = {
      name: "d",
      total_bytes: GiB,
      free_bytes: GiB,
      h2d_gbps: 0,
      tflops: 0,
      dispatch_us: 0,
    };
    const expected = planToJson(planJob(model, device, { policy: "sdcpp", stream: true }));
    expect(await planJson(modelPath, "--device-memory", "1GiB")).toEqual(expected);
  });

  it("passes --batch and --tokens to the footprint", async () => {
    const model = await modelProfileFromFile(modelPath, { batch: 4, tokens: 256 });
    const device = {
      name: "d",
      total_bytes: 600 * MiB,
      free_bytes: 600 * MiB,
      h2d_gbps: 0,
      tflops: 0,
      dispatch_us: 0,
    };
    const expected = planToJson(
      planJob(model, device, { policy: "sdcpp", stream: false, maxVramGiB: 0.25 }),
    );
    const json = await planJson(
      modelPath,
      "--device-memory",
      "600MiB",
      "--batch",
      "4",
      "--tokens",
      "256",
      "--no-stream",
      "--max-vram",
      "0.25",
    );
    expect(json).toEqual(expected);
  });

  it("takes the device from --profile when both are given", async () => {
    const run = await plan(modelPath, "--profile", tiny, "--json");
    expect(run.code).toBe(0);
    expect(run.stderr).toBe(
      `ferry plan: warning: ${tiny}: model ignored; planning the model file ${modelPath}\n`,
    );
    const model = await modelProfileFromFile(modelPath, { batch: 1, tokens: 64 });
    const { device } = await readProfileFile(tiny);
    expect(JSON.parse(run.stdout)).toEqual(
      planToJson(planJob(model, device, { policy: "sdcpp", stream: true })),
    );
  });

  it("the human output names the model file", async () => {
    const run = await plan(modelPath, "--device-memory", "1GiB");
    expect(run.code).toBe(0);
    expect(run.stdout).toMatch(/^Model dit\.safetensors: 5 base segments/);
    expect(run.stdout).toContain("Device --device-memory 1.0 GiB: 1.0 GiB free of 1.0 GiB");
  });
});

describe("ferry plan errors", () => {
  it.each([
    [[], "ferry plan: give a model file or --profile p.json (see ferry plan --help)\n"],
    [
      ["model.safetensors"],
      "ferry plan: --device-memory is required with a model file (e.g. --device-memory 12GiB)\n",
    ],
    [
      ["--profile", "/nonexistent/p.json"],
      "ferry plan: cannot read profile /nonexistent/p.json: no such file\n",
    ],
    [
      ["/nonexistent/model.safetensors", "--device-memory", "1GiB"],
      "ferry plan: file not found: /nonexistent/model.safetensors\n",
    ],
    [
      ["--profile", tiny, "--policy", "bogus"],
      "ferry plan: unknown policy 'bogus' (known: sdcpp, sdcpp-prefetch, ferry)\n",
    ],
    [
      ["--profile", tiny, "--max-vram", "-20"],
      "ferry plan: --max-vram -20 leaves no memory: free 2.0 GiB − 20.0 GiB\n",
    ],
    [
      ["--profile", tiny, "--max-vram", "0.05"],
      "ferry plan: segment blocks.0 needs 88.0 MiB (params 64.0 MiB + compute 16.0 MiB + " +
        "activations in 4.0 MiB + out 4.0 MiB) but the effective budget E is 51.2 MiB " +
        "(3 other segment(s) are over E too)\n",
    ],
  ])("%j", async (args, stderr) => {
    const run = await plan(...args);
    expect(run.code).toBe(1);
    expect(run.stdout).toBe("");
    expect(run.stderr).toBe(stderr);
  });

  it("a bad profile field is named", async () => {
    const path = join(dir, "bad.json");
    await writeFile(
      path,
      JSON.stringify({
        model: { name: "m", segments: [{ name: "a", param_bytes: -1 }] },
        device: { name: "d", total_bytes: 1, free_bytes: 1 },
      }),
    );
    const run = await plan("--profile", path);
    expect(run.code).toBe(1);
    expect(run.stderr).toBe(
      `ferry plan: ${path}: model.segments[0].param_bytes must be a non-negative number (got -1)\n`,
    );
  });

  it.each([
    [
      ["--profile", tiny, "--max-vram", "abc"],
      "option '--max-vram <GiB>' argument 'abc' is invalid",
    ],
    [["--profile", tiny, "--max-vram"], "option '--max-vram <GiB>' argument missing"],
    [["--profile", tiny, "--batch", "0"], "--batch must be a whole number ≥ 1."],
    [["--profile", tiny, "--tokens", "2.5"], "--tokens must be a whole number ≥ 1."],
    [["--profile", tiny, "--device-memory", "12XB"], "'12XB' is not a size"],
    [["--profile", tiny, "--device-memory", "0"], "--device-memory must be more than 0 bytes."],
    [["a.safetensors", "b.safetensors"], "too many arguments"],
    [["--profile", tiny, "--bogus"], "unknown option '--bogus'"],
  ])("rejects bad arguments before planning: %j", async (args, fragment) => {
    const run = await plan(...args);
    expect(run.code).toBe(1);
    expect(run.stdout).toBe("");
    expect(run.stderr.startsWith("ferry plan: ")).toBe(true);
    expect(run.stderr).toContain(fragment);
  });

  it("never prints a stack trace", async () => {
    const run = await plan("--profile", tiny, "--max-vram", "-20");
    expect(run.stderr).not.toMatch(/\n\s+at /);
  });
});

describe("register", () => {
  it("adds `plan` to a ferry program beside other commands", async () => {
    let out = "";
    const program = new Command("ferry").exitOverride();
    program.command("other").action(() => {});
    register(program, { stdout: (text) => void (out += text), stderr: () => {} });
    await program.parseAsync([
      "node",
      "ferry",
      "plan",
      "--profile",
      tiny,
      "--max-vram",
      "-1",
      "--json",
    ]);
    expect(JSON.parse(out).budget.B).toBe(GiB);
  });

  it("--help describes every option", async () => {
    const run = await plan("--help");
    expect(run.code).toBe(0);
    for (const option of [
      "--profile <file>",
      "--max-vram <GiB>",
      "--no-stream",
      "--policy <name>",
      "--batch <n>",
      "--tokens <n>",
      "--device-memory <size>",
      "--json",
    ]) {
      expect(run.stdout).toContain(option);
    }
  });
});
