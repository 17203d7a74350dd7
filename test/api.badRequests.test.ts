import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { execFileSync } from "node:child_process";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  Client,
  credentials,
  Metadata,
  status,
  type CallOptions,
  type ServiceError,
} from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  CancelJobRequest,
  ConnectRequest,
  GetJobRequest,
  GetPlanRequest,
  ListExecutorsRequest,
  ListJobsRequest,
  ListModelsRequest,
  LoadModelRequest,
  SchedulerServiceClient,
  SetBudgetRequest,
  SubmitJobRequest,
  UnloadModelRequest,
  WatchJobRequest,
  type ConnectResponse,
  JobSpec,
} from "../gen/ferry/v1/scheduler";
import { genModel } from "../lib/model/genModel";
import { startSchedulerServer, type SchedulerServer } from "../services/scheduler/server";
import { FakeExecutor } from "./helpers/fakeExecutor";

/**
 * Every RPC of ferry.v1.SchedulerService with missing, invalid, oversized and out-of-range fields,
 * unknown ids, a missing or wrong token, expired deadlines, undecodable bytes and mid-stream
 * cancels, each with the status a caller should get (issue 12). After the table, the server must
 * still answer a valid request: no row may take it down or stall it.
 */

const TOKEN = "bad-requests-token";
const SERVICE = "/ferry.v1.SchedulerService/";

type Code = keyof typeof status;
/** One row: the RPC, what is wrong, the request (a message, or raw bytes), the status expected. */
interface Row {
  rpc: string;
  what: string;
  request: unknown;
  expect: Code;
  /** Call without the token / with another. */
  auth?: "none" | "wrong";
  /** A deadline already past. */
  expired?: boolean;
}

const huge = (n: number) => "x".repeat(n);

/** Each RPC's request type: a row's partial message is completed with defaults to be encoded. */
const REQUESTS: Record<string, { fromPartial(object: never): unknown }> = {
  SubmitJob: SubmitJobRequest,
  WatchJob: WatchJobRequest,
  CancelJob: CancelJobRequest,
  GetJob: GetJobRequest,
  ListJobs: ListJobsRequest,
  GetPlan: GetPlanRequest,
  ListExecutors: ListExecutorsRequest,
  ListModels: ListModelsRequest,
  LoadModel: LoadModelRequest,
  UnloadModel: UnloadModelRequest,
  SetBudget: SetBudgetRequest,
};

describe("bad requests: every RPC, each with its status (issue 12)", () => {
  let dir: string;
  let modelPath: string;
  let server: SchedulerServer;
  let stub: SchedulerServiceClient;
  let raw: Client;
  let executor: FakeExecutor;
  let runningJobId: string;
  const tried: { row: Row; got: Code }[] = [];

  const spec = (overrides: Partial<JobSpec> = {}): JobSpec =>
    JobSpec.fromPartial({
      modelPath: "tiny",
      steps: 2,
      batch: 1,
      tokens: 8,
      seed: 0,
      policy: "sdcpp",
      ...overrides,
    });

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "ferry-bad-requests-"));
    modelPath = join(dir, "tiny.safetensors");
    await genModel(modelPath, { blocks: 2, hidden: 32, heads: 2, channels: 4 });
    await writeFile(join(dir, "junk.safetensors"), "not a model at all");
    execFileSync("mkfifo", [join(dir, "pipe.safetensors")]);
    server = await startSchedulerServer({
      listen: "127.0.0.1:0",
      modelDirs: [dir],
      heartbeatIntervalMs: 100,
      token: TOKEN,
      log: () => {},
    });
    stub = new SchedulerServiceClient(server.address, credentials.createInsecure());
    raw = new Client(server.address, credentials.createInsecure());
    executor = new FakeExecutor(server.address, "table-gpu", undefined, {}, TOKEN);
    await executor.connect();
    // A job that stays running (the scripted executor never finishes it) for the job verbs.
    runningJobId = (await call("SubmitJob", { spec: spec() }, "OK")).jobId as string;
  });

  afterAll(async () => {
    executor?.close();
    stub?.close();
    raw?.close();
    await server?.close(100);
    await rm(dir, { recursive: true, force: true });
  });

  const metadataFor = (auth: Row["auth"]) => {
    const metadata = new Metadata();
    if (auth !== "none") {
      metadata.set("authorization", `Bearer ${auth === "wrong" ? "not-the-token" : TOKEN}`);
    }
    return metadata;
  };

  const codeName = (code: number): Code =>
    (Object.entries(status).find(([, value]) => value === code)?.[0] ?? "UNKNOWN") as Code;

  /** A unary call by name: a message through the generated stub, bytes through a raw client. */
  function call(
    rpc: string,
    request: unknown,
    _expected: Code,
    auth?: Row["auth"],
    expired = false,
  ): Promise<Record<string, unknown> & { code?: Code }> {
    const options: CallOptions = { deadline: expired ? Date.now() - 1000 : Date.now() + 10_000 };
    return new Promise((resolve) => {
      const done = (error: ServiceError | null, response?: unknown) =>
        resolve(
          error
            ? { code: codeName(error.code), message: error.details }
            : { code: "OK", ...(response as object) },
        );
      if (Buffer.isBuffer(request)) {
        raw.makeUnaryRequest(
          SERVICE + rpc,
          (b: Buffer) => b,
          (b: Buffer) => b,
          request,
          metadataFor(auth),
          options,
          (error, response) => done(error, { bytes: response }),
        );
        return;
      }
      const method = rpc.charAt(0).toLowerCase() + rpc.slice(1);
      (stub as unknown as Record<string, (...args: unknown[]) => void>)[method](
        REQUESTS[rpc].fromPartial(request as never),
        metadataFor(auth),
        options,
        done,
      );
    });
  }

  /** WatchJob: the status its stream ends with (OK for a finished one; the fake never finishes). */
  function watch(row: Row, cancelAfterMs?: number): Promise<Code> {
    return new Promise((resolve) => {
      const stream = stub.watchJob(
        WatchJobRequest.fromPartial(row.request as never),
        metadataFor(row.auth),
        {
          deadline: row.expired ? Date.now() - 1000 : Date.now() + 10_000,
        },
      );
      stream.on("data", () => {});
      stream.on("error", (error: ServiceError) => resolve(codeName(error.code)));
      stream.on("end", () => resolve("OK"));
      if (cancelAfterMs !== undefined) setTimeout(() => stream.cancel(), cancelAfterMs);
    });
  }

  /** Connect: the status the stream ends with after these messages (OK: still open after 300 ms). */
  function connect(row: Row): Promise<Code> {
    return new Promise((resolve) => {
      const stream = stub.connect(metadataFor(row.auth));
      let settled = false;
      const settle = (code: Code) => {
        if (settled) return;
        settled = true;
        resolve(code);
        stream.cancel();
      };
      stream.on("data", (_: ConnectResponse) => {});
      stream.on("error", (error: ServiceError) => settle(codeName(error.code)));
      stream.on("end", () => settle("OK"));
      for (const message of row.request as ConnectRequest["message"][]) {
        stream.write(ConnectRequest.fromPartial({ message }));
      }
      setTimeout(() => settle("OK"), 300);
    });
  }

  const device = {
    name: "fake",
    kind: "cpu",
    totalBytes: 1 << 30,
    freeBytes: 1 << 30,
    h2dGbps: 10,
    threads: 1,
    tflops: 1,
    dispatchUs: 10,
  };
  const register = (executorId: string, overrides: Record<string, unknown> = {}) => ({
    $case: "register" as const,
    value: {
      executorId,
      instance: `instance-${executorId}`,
      version: "test",
      device: { ...device, ...overrides },
      holdings: undefined,
    },
  });

  // Every unary RPC and a valid request for it, for the rows every RPC gets.
  const unaryRpcs = (): [string, unknown][] => [
    ["SubmitJob", { spec: spec({ seed: 99 }) }],
    ["CancelJob", { jobId: "job-unknown" }],
    ["GetJob", { jobId: runningJobId }],
    ["ListJobs", {}],
    ["GetPlan", { spec: spec() }],
    ["ListExecutors", {}],
    ["ListModels", {}],
    ["LoadModel", { model: "tiny", executorId: "table-gpu" }],
    ["UnloadModel", { model: "tiny", executorId: "table-gpu" }],
    ["SetBudget", { executorId: "table-gpu", budgetBytes: 512 << 20 }],
  ];

  const rows = (): Row[] => {
    const table: Row[] = [];
    const add = (rpc: string, what: string, request: unknown, expected: Code, extra = {}) =>
      table.push({ rpc, what, request, expect: expected, ...extra });

    // Every RPC: no token, a wrong token, an expired deadline, bytes that are not a message.
    for (const [rpc, request] of unaryRpcs()) {
      add(rpc, "no token", request, "UNAUTHENTICATED", { auth: "none" });
      add(rpc, "wrong token", request, "UNAUTHENTICATED", { auth: "wrong" });
      add(rpc, "deadline already past", request, "DEADLINE_EXCEEDED", { expired: true });
    }
    // Field 1 as a varint with a truncated body, and a uint64 past 2^53 in JobSpec.seed.
    for (const rpc of ["SubmitJob", "CancelJob", "GetJob", "ListJobs", "GetPlan", "LoadModel"]) {
      add(rpc, "undecodable bytes", Buffer.from([0x0a, 0xff, 0xff, 0xff]), "INVALID_ARGUMENT");
    }

    // SubmitJob and GetPlan share the spec's checks.
    const specRows: [string, Partial<JobSpec> | undefined, Code][] = [
      ["missing spec", undefined, "INVALID_ARGUMENT"],
      ["empty model_path", { modelPath: "" }, "INVALID_ARGUMENT"],
      ["model_path of 1 MB", { modelPath: huge(1 << 20) }, "INVALID_ARGUMENT"],
      ["model outside the repository", { modelPath: "/etc/passwd" }, "NOT_FOUND"],
      ["model escaping with ..", { modelPath: "../../etc/shadow" }, "NOT_FOUND"],
      ["model that does not exist", { modelPath: "nope" }, "NOT_FOUND"],
      ["model that is a FIFO", { modelPath: "pipe.safetensors" }, "INVALID_ARGUMENT"],
      ["model that is not a model", { modelPath: "junk.safetensors" }, "INVALID_ARGUMENT"],
      ["steps 0", { steps: 0 }, "INVALID_ARGUMENT"],
      ["steps 2,000,000", { steps: 2_000_000 }, "INVALID_ARGUMENT"],
      ["batch 100,000", { batch: 100_000 }, "INVALID_ARGUMENT"],
      ["tokens 2^30", { tokens: 1 << 30 }, "INVALID_ARGUMENT"],
      ["output over 64 MiB", { batch: 4096, tokens: 1 << 20 }, "INVALID_ARGUMENT"],
      ["max_vram_gib 1e11", { maxVramGib: 1e11 }, "INVALID_ARGUMENT"],
      ["max_vram_gib 1e300", { maxVramGib: 1e300 }, "INVALID_ARGUMENT"],
      ["max_vram_gib -1e300", { maxVramGib: -1e300 }, "INVALID_ARGUMENT"],
      ["max_vram_gib NaN", { maxVramGib: Number.NaN }, "INVALID_ARGUMENT"],
      ["max_vram_gib Infinity", { maxVramGib: Number.POSITIVE_INFINITY }, "INVALID_ARGUMENT"],
      ["budget below a segment", { maxVramGib: 1e-9 }, "RESOURCE_EXHAUSTED"],
      ["unknown policy", { policy: "bogus" }, "INVALID_ARGUMENT"],
      ["policy of 100 kB", { policy: huge(100_000) }, "INVALID_ARGUMENT"],
      ["unknown executor", { executorId: "nobody" }, "NOT_FOUND"],
      ["executor_id of 100 kB", { executorId: huge(100_000) }, "INVALID_ARGUMENT"],
      ["unknown params_backend", { paramsBackend: "tape" }, "INVALID_ARGUMENT"],
      ["unknown load", { load: "sometimes" }, "INVALID_ARGUMENT"],
    ];
    for (const [what, overrides, expected] of specRows) {
      for (const rpc of ["SubmitJob", "GetPlan"]) {
        add(rpc, what, { spec: overrides && spec(overrides) }, expected);
      }
    }
    // 0 is proto3's "not set": batch 1 and 64 tokens (documented in JobSpec).
    add("GetPlan", "batch 0 (means 1)", { spec: spec({ batch: 0 }) }, "OK");
    add("GetPlan", "tokens 0 (means 64)", { spec: spec({ tokens: 0 }) }, "OK");
    add("SubmitJob", "priority 5000", { spec: spec(), priority: 5000 }, "INVALID_ARGUMENT");
    add("SubmitJob", "priority -5000", { spec: spec(), priority: -5000 }, "INVALID_ARGUMENT");
    add(
      "SubmitJob",
      "idempotency key of 10 kB",
      { spec: spec(), idempotencyKey: huge(10_000) },
      "INVALID_ARGUMENT",
    );
    add(
      "SubmitJob",
      "idempotency key with a slash",
      { spec: spec(), idempotencyKey: "a/b" },
      "INVALID_ARGUMENT",
    );
    add(
      "SubmitJob",
      "idempotency key reused for another spec",
      { spec: spec({ seed: 5 }), idempotencyKey: "reused-key" },
      "ALREADY_EXISTS",
    );

    // The job verbs.
    for (const rpc of ["CancelJob", "GetJob"]) {
      add(rpc, "missing job_id", {}, "INVALID_ARGUMENT");
      add(rpc, "unknown job_id", { jobId: "job-00000000" }, "NOT_FOUND");
      add(rpc, "job_id of 100 kB", { jobId: huge(100_000) }, "INVALID_ARGUMENT");
    }
    add("GetJob", "a running job", { jobId: runningJobId }, "OK");
    add("ListJobs", "page_size 5000", { pageSize: 5000 }, "INVALID_ARGUMENT");
    add("ListJobs", "page_token not a token", { pageToken: "abc" }, "INVALID_ARGUMENT");
    add("ListJobs", "page_token negative", { pageToken: "-5" }, "INVALID_ARGUMENT");
    add("ListJobs", "page_token of 10 kB", { pageToken: huge(10_000) }, "INVALID_ARGUMENT");
    add("ListJobs", "an unknown state", { states: [99] }, "INVALID_ARGUMENT");
    add("ListJobs", "a page", { pageSize: 1 }, "OK");
    add("ListExecutors", "valid", {}, "OK");
    add("ListModels", "valid", {}, "OK");

    // The model verbs.
    for (const rpc of ["LoadModel", "UnloadModel"]) {
      add(rpc, "missing model", { executorId: "table-gpu" }, "INVALID_ARGUMENT");
      add(rpc, "model of 1 MB", { model: huge(1 << 20) }, "INVALID_ARGUMENT");
      add(rpc, "model outside the repository", { model: "/etc/passwd" }, "NOT_FOUND");
      add(rpc, "unknown executor", { model: "tiny", executorId: "nobody" }, "NOT_FOUND");
      add(
        rpc,
        "executor_id of 100 kB",
        { model: "tiny", executorId: huge(100_000) },
        "INVALID_ARGUMENT",
      );
    }
    add("LoadModel", "a FIFO", { model: "pipe.safetensors" }, "INVALID_ARGUMENT");

    // The live budget.
    const budget = (budgetBytes: number, executorId = "table-gpu") => ({ executorId, budgetBytes });
    add("SetBudget", "missing executor_id", { budgetBytes: 1 << 20 }, "INVALID_ARGUMENT");
    add("SetBudget", "executor_id of 100 kB", budget(1 << 20, huge(100_000)), "INVALID_ARGUMENT");
    add("SetBudget", "unknown executor", budget(1 << 20, "nobody"), "NOT_FOUND");
    add("SetBudget", "budget 0", budget(0), "INVALID_ARGUMENT");
    add("SetBudget", "budget past the device's memory", budget(2 ** 40), "INVALID_ARGUMENT");
    add("SetBudget", "budget past 2^53", budget(2 ** 60), "INVALID_ARGUMENT");
    add(
      "SetBudget",
      "undecodable bytes",
      Buffer.from([0x0a, 0xff, 0xff, 0xff]),
      "INVALID_ARGUMENT",
    );
    return table;
  };

  const watchRows = (): Row[] => [
    {
      rpc: "WatchJob",
      what: "no token",
      request: { jobId: runningJobId },
      expect: "UNAUTHENTICATED",
      auth: "none",
    },
    {
      rpc: "WatchJob",
      what: "wrong token",
      request: { jobId: runningJobId },
      expect: "UNAUTHENTICATED",
      auth: "wrong",
    },
    {
      rpc: "WatchJob",
      what: "deadline already past",
      request: { jobId: runningJobId },
      expect: "DEADLINE_EXCEEDED",
      expired: true,
    },
    { rpc: "WatchJob", what: "missing job_id", request: {}, expect: "INVALID_ARGUMENT" },
    {
      rpc: "WatchJob",
      what: "unknown job_id",
      request: { jobId: "job-00000000" },
      expect: "NOT_FOUND",
    },
    {
      rpc: "WatchJob",
      what: "job_id of 100 kB",
      request: { jobId: huge(100_000) },
      expect: "INVALID_ARGUMENT",
    },
    {
      rpc: "WatchJob",
      what: "output_chunk_bytes 10",
      request: { jobId: runningJobId, outputChunkBytes: 10 },
      expect: "INVALID_ARGUMENT",
    },
    {
      rpc: "WatchJob",
      what: "output_chunk_bytes 2^31",
      request: { jobId: runningJobId, outputChunkBytes: 2 ** 31 },
      expect: "INVALID_ARGUMENT",
    },
  ];

  const connectRows = (): Row[] => [
    {
      rpc: "Connect",
      what: "no token",
      request: [register("c-none")],
      expect: "UNAUTHENTICATED",
      auth: "none",
    },
    {
      rpc: "Connect",
      what: "wrong token",
      request: [register("c-wrong")],
      expect: "UNAUTHENTICATED",
      auth: "wrong",
    },
    {
      rpc: "Connect",
      what: "heartbeat before Register",
      request: [{ $case: "heartbeat", value: { freeBytes: 1, holdings: undefined } }],
      expect: "FAILED_PRECONDITION",
    },
    {
      rpc: "Connect",
      what: "a result before Register",
      request: [
        { $case: "jobUpdate", value: { update: { $case: "result", value: { jobId: "x" } } } },
      ],
      expect: "FAILED_PRECONDITION",
    },
    {
      rpc: "Connect",
      what: "Register without a device",
      request: [
        { ...register("c-nodev"), value: { ...register("c-nodev").value, device: undefined } },
      ],
      expect: "INVALID_ARGUMENT",
    },
    {
      rpc: "Connect",
      what: "device total_bytes 0",
      request: [register("c-zero", { totalBytes: 0 })],
      expect: "INVALID_ARGUMENT",
    },
    {
      rpc: "Connect",
      what: "device h2d_gbps NaN",
      request: [register("c-nan", { h2dGbps: Number.NaN })],
      expect: "INVALID_ARGUMENT",
    },
    {
      rpc: "Connect",
      what: "device tflops 1e300",
      request: [register("c-big", { tflops: 1e300 })],
      expect: "INVALID_ARGUMENT",
    },
    {
      rpc: "Connect",
      what: "device kind unknown",
      request: [register("c-kind", { kind: "tpu" })],
      expect: "INVALID_ARGUMENT",
    },
    {
      rpc: "Connect",
      what: "executor_id with a slash",
      request: [register("../../etc")],
      expect: "INVALID_ARGUMENT",
    },
    {
      rpc: "Connect",
      what: "executor_id of 10 kB",
      request: [register(huge(10_000))],
      expect: "INVALID_ARGUMENT",
    },
    {
      rpc: "Connect",
      what: "a connected executor's id",
      request: [register("table-gpu")],
      expect: "ALREADY_EXISTS",
    },
    { rpc: "Connect", what: "a valid Register", request: [register("c-valid")], expect: "OK" },
  ];

  it("gives each row its status, and stays up and responsive", async () => {
    // The key that the "reused" row collides with.
    const first = await call("SubmitJob", { spec: spec(), idempotencyKey: "reused-key" }, "OK");
    expect(first.code, String(first.message)).toBe("OK");
    for (const row of rows()) {
      const response = await call(row.rpc, row.request, row.expect, row.auth, row.expired);
      tried.push({ row, got: response.code! });
      if (response.code !== "OK" && response.code !== "UNAUTHENTICATED") {
        // Errors name the problem briefly and never echo a long input back.
        expect(String(response.message).length, `${row.rpc}: ${row.what}`).toBeLessThan(400);
      }
    }
    for (const row of watchRows()) tried.push({ row, got: await watch(row) });
    for (const row of connectRows()) tried.push({ row, got: await connect(row) });
    // Mid-stream cancels: a watcher and an executor stream that go away must not disturb anyone.
    const cancelWatch: Row = {
      rpc: "WatchJob",
      what: "cancelled mid-stream",
      request: { jobId: runningJobId },
      expect: "CANCELLED",
    };
    tried.push({ row: cancelWatch, got: await watch(cancelWatch, 100) });

    const wrong = tried.filter(({ row, got }) => got !== row.expect);
    expect(
      wrong.map(({ row, got }) => `${row.rpc} ${row.what}: expected ${row.expect}, got ${got}`),
    ).toEqual([]);
    // Deadlines that had passed created no job.
    const jobs = await call("ListJobs", { pageSize: 1000 }, "OK");
    expect((jobs.jobs as unknown[]).length).toBe(2);
    // Still up: a valid request after the table is answered, and the running job is untouched.
    const after = await call("GetJob", { jobId: runningJobId }, "OK");
    expect(after.code).toBe("OK");
    expect(executor.ended).toBe(false);
    // No SetBudget row changed the budget: the one with a valid request had an expired deadline.
    const listed = await call("ListExecutors", {}, "OK");
    expect((listed.executors as { budgetBytes: number }[])[0]!.budgetBytes).toBe(1 << 30);
    const counts = new Map<string, number>();
    for (const { row } of tried) counts.set(row.rpc, (counts.get(row.rpc) ?? 0) + 1);
    console.log(
      `bad requests: ${tried.length} cases over ${counts.size} RPCs (${[...counts]
        .map(([rpc, n]) => `${rpc} ${n}`)
        .join(", ")}), each with its expected status`,
    );
    expect(counts.size).toBe(12);
  }, 60_000);
});
