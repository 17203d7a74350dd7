import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Command } from "commander";
import { describe, expect, it } from "vitest";
import {
  benchBudgets,
  formatPlanBench,
  mulberry32,
  planBenchJson,
  planBenchMarkdown,
  runPlanBench,
  summarise,
  syntheticProfile,
} from "../bench/plan";
import { benchDevices, benchModels, profileFiles } from "../bench/profiles";
import { register } from "../cli/commands/bench";
import { GiB } from "../lib/config/units";
import { lowerBoundFor } from "../lib/planner/lowerBound";
import { planJob } from "../lib/planner/planJob";

/** Runs `ferry bench <args>` in-process. */
async function bench(...args: string[]) {
  const run = { code: 0, stdout: "", stderr: "" };
  const program = new Command("ferry").exitOverride();
  register(program, {
    stdout: (text) => void (run.stdout += text),
    stderr: (text) => void (run.stderr += text),
    setExitCode: (code) => void (run.code = code),
  });
  await program.parseAsync(["bench", ...args], { from: "user" });
  return run;
}

describe("plan bench", () => {
  const result = runPlanBench();

  it("covers every model × device with streaming budgets, ferry never slower, never below the bound", () => {
    const pairs = new Set(result.rows.map((r) => `${r.profile} ${r.device}`));
    expect(pairs.size).toBeGreaterThan(30); // 12 model files × 3 devices, less the few that never stream
    for (const row of result.rows) {
      expect(row.ferry_s).toBeLessThanOrEqual(row.sdcpp_s * (1 + 1e-12));
      expect(row.ferry_s).toBeGreaterThanOrEqual(row.lower_bound_s * (1 - 1e-9));
      expect(row.sdcpp_over_ferry).toBeCloseTo(row.sdcpp_s / row.ferry_s, 12);
    }
    // Where transfer and compute are of the same order, the cost model pays off on the
    // transformer models (the UNet is limited by its working sets; see bench/RESULTS-plan.md).
    const balanced = result.rows.filter(
      (r) => r.balance >= 0.5 && r.balance <= 2 && !r.profile.startsWith("sdxl"),
    );
    expect(balanced.length).toBeGreaterThan(5);
    for (const row of balanced) expect(row.sdcpp_over_ferry).toBeGreaterThanOrEqual(1.5);
  });

  it("picks budgets where the model must stream", () => {
    const flux = benchModels().find((m) => m.id === "flux1-dev-bf16")!.model;
    const [rtx3060, rtx4090, h100] = benchDevices().map((d) => d.device);
    expect(benchBudgets(flux, rtx3060)).toEqual([-1, 6, 3]);
    expect(benchBudgets(flux, rtx4090)).toEqual([-1, 12, 6]);
    // Flux fits an H100 at −1 and at 40 GiB: only the quarter streams.
    expect(benchBudgets(flux, h100)).toEqual([20]);
    const sdxl = benchModels().find((m) => m.id === "sdxl-unet-q8_0")!.model;
    // Fits everywhere on an H100: budgets from the model's size instead.
    const budgets = benchBudgets(sdxl, h100);
    expect(budgets.length).toBeGreaterThan(0);
    for (const gib of budgets) {
      expect(gib * GiB).toBeLessThan(h100.free_bytes / 4);
      expect(lowerBoundFor(sdxl, h100, { maxVramGiB: gib, stream: true }).streaming_necessary).toBe(
        true,
      );
    }
  });

  it("JSON rows start with the agreed keys", () => {
    for (const row of planBenchJson(result)) {
      expect(Object.keys(row).slice(0, 6)).toEqual([
        "profile",
        "device",
        "max_vram",
        "sdcpp_s",
        "ferry_s",
        "lower_bound_s",
      ]);
    }
  });

  it("human and Markdown output have the table and the summary", () => {
    const speed = { segments: 1000, runs: 7, median_ms: 3, min_ms: 2, max_ms: 4 };
    const text = formatPlanBench(result, speed);
    expect(text.split("\n")[0]).toMatch(
      /^profile\s+device\s+max-vram\s+sdcpp\s+ferry\s+bound\s+sdcpp\/ferry\s+ferry\/bound/,
    );
    expect(text).toContain(`${result.rows.length} cases; ferry predicted no slower than sdcpp in`);
    expect(text).toContain("1000-segment synthetic profile planned in 3.0 ms");
    const markdown = planBenchMarkdown(result, speed);
    expect(markdown).toMatch(/^# Plan bench/);
    expect(markdown).toContain("| profile ");
    // Header, delimiter row, one row per case.
    expect(markdown.split("\n").filter((l) => l.startsWith("| ")).length).toBe(
      result.rows.length + 2,
    );
    expect(summarise(result).rows).toBe(result.rows.length);
  });

  it("the synthetic profile is deterministic and plannable", () => {
    const a = syntheticProfile(1000);
    expect(syntheticProfile(1000)).toEqual(a);
    expect(a.model.segments).toHaveLength(1000);
    const plan = planJob(a.model, a.device, {
      policy: "ferry",
      stream: true,
      maxVramGiB: a.maxVramGiB,
    });
    expect(plan.streamed_bytes_per_step).toBeGreaterThan(0);
    expect(plan.predicted_step_s).toBeGreaterThanOrEqual(plan.lower_bound_s!);
    const [x, y] = [mulberry32(5), mulberry32(5)];
    expect([x(), x(), x()]).toEqual([y(), y(), y()]);
  });
});

describe("ferry bench CLI", () => {
  it("bench plan --json prints the rows", async () => {
    const run = await bench("plan", "--json");
    expect(run.code).toBe(0);
    const rows = JSON.parse(run.stdout) as Array<Record<string, unknown>>;
    expect(rows).toEqual(planBenchJson(runPlanBench()));
  });

  it("bench plan prints the table without timing when asked", async () => {
    const run = await bench("plan", "--speed-segments", "0");
    expect(run.code).toBe(0);
    expect(run.stdout).toContain("sdcpp/ferry");
    expect(run.stdout).not.toContain("Planner speed");
  });

  it("bench profiles --out writes every profile file", async () => {
    const dir = await mkdtemp(join(tmpdir(), "ferry-bench-"));
    try {
      const run = await bench("profiles", "--out", dir);
      expect(run.code).toBe(0);
      const files = profileFiles();
      expect(run.stdout.trim().split("\n")).toHaveLength(files.length);
      expect((await readdir(join(dir, "models"))).length).toBe(12);
      const first = files[0];
      expect(JSON.parse(await readFile(join(dir, first.path), "utf8"))).toEqual(first.json);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
