import { execFile, execFileSync } from "node:child_process";
import { promisify } from "node:util";
import { mkdir, mkdtemp, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { JobState, JobSpec } from "../gen/ferry/v1/scheduler";
import { FerryClientError } from "../lib/client/schedulerClient";
import { genModel } from "../lib/model/genModel";
import { packageRoot } from "../lib/packageInfo";
import { startCluster, type Cluster } from "../services/cluster/localCluster";

const run = promisify(execFile);
const ferry = (...args: string[]) =>
  run(process.execPath, [join(packageRoot(), "dist", "cli", "ferry.js"), ...args]);

const codeOf = (error: unknown) => (error as FerryClientError).code;

// The model repository with a real executor process: what may be named, what is listed, and
// warming and evicting models.
describe("the model repository", () => {
  let root: string;
  let models: string;
  let extra: string;
  let outside: string;
  let cluster: Cluster;

  const spec = (modelPath: string, overrides: Partial<JobSpec> = {}): JobSpec =>
    JobSpec.fromPartial({
      modelPath,
      steps: 2,
      batch: 1,
      tokens: 8,
      seed: 0,
      policy: "sdcpp",
      ...overrides,
    });

  beforeAll(async () => {
    root = await mkdtemp(join(tmpdir(), "ferry-models-"));
    models = join(root, "models");
    extra = join(root, "extra");
    outside = join(root, "outside");
    for (const dir of [models, extra, outside, join(models, "sub")]) await mkdir(dir);
    await genModel(join(models, "tiny.safetensors"), {
      blocks: 2,
      hidden: 32,
      heads: 2,
      channels: 4,
    });
    await genModel(join(models, "sub", "q8.gguf"), {
      blocks: 2,
      hidden: 64,
      heads: 2,
      channels: 32,
      dtype: "q8_0",
    });
    await genModel(join(extra, "tiny.safetensors"), {
      blocks: 1,
      hidden: 32,
      heads: 2,
      channels: 4,
    });
    await genModel(join(outside, "secret.safetensors"), {
      blocks: 1,
      hidden: 32,
      heads: 2,
      channels: 4,
    });
    await writeFile(join(models, "junk.safetensors"), "not a model");
    await symlink(join(outside, "secret.safetensors"), join(models, "escape.safetensors"));
    await symlink(join(models, "tiny.safetensors"), join(models, "alias.safetensors"));
    execFileSync("mkfifo", [join(models, "pipe.safetensors")]);
    cluster = await startCluster([{ id: "gpu0", vram: "1GiB" }], { modelDirs: [models, extra] });
  }, 60_000);

  afterAll(async () => {
    await cluster?.stop();
    await rm(root, { recursive: true, force: true });
  });

  it("lists every model file with its name, architecture, size and dtype", async () => {
    const list = await cluster.client.listModels();
    const byName = new Map(list.map((model) => [model.name, model]));
    expect([...byName.keys()].sort()).toEqual(
      ["alias", "junk", "sub/q8", "tiny", join(extra, "tiny.safetensors")].sort(),
    );
    expect(byName.get("tiny")).toMatchObject({
      architecture: "ferry-dit",
      format: "safetensors",
      dtype: "F32",
      error: "",
    });
    expect(byName.get("tiny")!.bytes).toBeGreaterThan(byName.get("tiny")!.paramBytes);
    expect(byName.get("sub/q8")).toMatchObject({ format: "gguf", dtype: "mixed", error: "" });
    expect(byName.get("junk")!.error).toMatch(/not a model file/);
    // The symlink out and the FIFO are not models.
    expect(list.some((model) => model.path.includes("outside"))).toBe(false);
  });

  it("runs a model named by name, by relative path and by absolute path", async () => {
    const { client } = cluster;
    const byName = await client.runJob(spec("tiny"));
    const byRelative = await client.runJob(spec("tiny.safetensors"));
    const byAbsolute = await client.runJob(spec(join(models, "tiny.safetensors")));
    const byAlias = await client.runJob(spec("alias"));
    expect(byRelative.checksum).toBe(byName.checksum);
    expect(byAbsolute.checksum).toBe(byName.checksum);
    expect(byAlias.checksum).toBe(byName.checksum);
    const nested = await client.runJob(spec("sub/q8"));
    expect(nested.state).toBe(JobState.JOB_STATE_SUCCEEDED);
    const info = await client.getJob(byName.jobId);
    expect(info.spec?.modelPath).toBe(join(models, "tiny.safetensors"));
  }, 60_000);

  it("refuses anything outside the repository with one message, whether or not it exists", async () => {
    const refs = [
      join(outside, "secret.safetensors"),
      join(outside, "missing.safetensors"),
      "../outside/secret.safetensors",
      "../outside/missing.safetensors",
      "escape",
      "/etc/passwd",
      "/proc/self/environ",
      "/root/.ssh/id_rsa",
      "nope",
    ];
    const messages: string[] = [];
    for (const ref of refs) {
      const error = await cluster.client.submitJob(spec(ref)).catch((e: unknown) => e);
      expect(codeOf(error), ref).toBe("NOT_FOUND");
      messages.push((error as Error).message.replace(JSON.stringify(ref), "REF"));
    }
    expect(new Set(messages).size).toBe(1);
    expect(messages[0]).toMatch(/not in the model repository/);
  });

  it("never opens a FIFO for long, and never echoes a file's bytes", async () => {
    // Five submits naming a FIFO, then a valid one: none may hang.
    const pipes = await Promise.all(
      Array.from({ length: 5 }, () =>
        cluster.client.submitJob(spec("pipe.safetensors")).catch((e: unknown) => e),
      ),
    );
    for (const error of pipes) expect(codeOf(error)).toBe("INVALID_ARGUMENT");
    expect((pipes[0] as Error).message).toMatch(/not a regular file/);
    const ok = await cluster.client.runJob(spec("tiny"));
    expect(ok.state).toBe(JobState.JOB_STATE_SUCCEEDED);
    const dirError = await cluster.client.submitJob(spec("sub")).catch((e: unknown) => e);
    expect(codeOf(dirError)).toBe("INVALID_ARGUMENT");
    const junk = await cluster.client.submitJob(spec("junk")).catch((e: unknown) => e);
    expect(codeOf(junk)).toBe("INVALID_ARGUMENT");
    expect((junk as Error).message).not.toMatch(/not a model file.*[0-9a-f]{2} [0-9a-f]{2}/);
    expect((junk as Error).message).not.toContain('not a model"');
  }, 30_000);

  it("warms a model on an executor and evicts it", async () => {
    const { client } = cluster;
    const loaded = await client.loadModel("sub/q8", { executorId: "gpu0", resident: true });
    expect(loaded.executorId).toBe("gpu0");
    expect(loaded.modelPath).toBe(join(models, "sub", "q8.gguf"));
    expect(loaded.hostCacheBytes).toBeGreaterThan(0);
    expect(loaded.residentBytes).toBeGreaterThan(0);
    const executor = (await client.listExecutors()).executors[0];
    expect(executor.warmModels).toContain("sub/q8");
    expect(executor.models.find((m) => m.path === loaded.modelPath)?.pinned).toBe(true);
    const evicted = await client.unloadModel("sub/q8");
    expect(evicted).toEqual(["gpu0"]);
    const after = (await client.listExecutors()).executors[0];
    expect(after.warmModels).not.toContain("sub/q8");
    expect(after.residentBytes).toBe(0);
    const unknown = await client.loadModel("/etc/passwd").catch((e: unknown) => e);
    expect(codeOf(unknown)).toBe("NOT_FOUND");
    const noExecutor = await client
      .loadModel("tiny", { executorId: "nope" })
      .catch((e: unknown) => e);
    expect(codeOf(noExecutor)).toBe("NOT_FOUND");
  }, 60_000);

  it("prefers an executor where the model is warm", async () => {
    // One executor here, so check what placement sees: the model it just ran is warm there.
    await cluster.client.runJob(spec("tiny"));
    const executor = (await cluster.client.listExecutors()).executors[0];
    expect(executor.warmModels).toContain("tiny");
  });

  it("`ferry models --json` and `ferry run --json` print JSON alone on stdout", async () => {
    const address = cluster.server.address;
    const listed = await ferry("models", "list", "--json", "--scheduler", address);
    expect(JSON.parse(listed.stdout).map((m: { name: string }) => m.name)).toContain("tiny");
    const ran = await ferry(
      "run",
      "--model",
      "tiny",
      "--steps",
      "2",
      "--tokens",
      "8",
      "--json",
      "--scheduler",
      address,
    );
    const parsed = JSON.parse(ran.stdout);
    expect(parsed.checksum).toMatch(/^[0-9a-f]{64}$/);
    expect(parsed.plan.segments.length).toBeGreaterThan(0);
    expect(ran.stderr).toMatch(/^job job-/);
    const jobs = await ferry(
      "jobs",
      "list",
      "--state",
      "succeeded",
      "--json",
      "--scheduler",
      address,
    );
    expect(JSON.parse(jobs.stdout).map((j: { jobId: string }) => j.jobId)).toContain(parsed.job_id);
  }, 60_000);
});
