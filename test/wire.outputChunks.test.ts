import { randomBytes } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { credentials, type ServiceError } from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  ConnectRequest,
  JobResult,
  JobState,
  SchedulerServiceClient,
  WatchJobResponse,
  JobSpec,
  type StepStats,
} from "../gen/ferry/v1/scheduler";
import { SchedulerClient } from "../lib/client/schedulerClient";
import { genModel } from "../lib/model/genModel";
import { CLIENT_MESSAGE_LIMIT, RESULT_STATS_LIMIT } from "../lib/wire/limits";
import { fitResultStats, OutputAssembler, resultMessages } from "../lib/wire/outputChunks";
import { startSchedulerServer, type SchedulerServer } from "../services/scheduler/server";
import { OutboundQueue } from "../services/executor/outboundQueue";
import { FakeExecutor } from "./helpers/fakeExecutor";

const MiB = 1024 * 1024;

const step = (n: number, segments = 0): StepStats => ({
  step: n,
  stepSeconds: 0.001,
  prepareSeconds: 0,
  h2dSeconds: 0,
  computeSeconds: 0.001,
  h2dBytes: 0,
  diskBytes: 0,
  arenaPeakBytes: 0,
  segments: Array.from({ length: segments }, (_, index) => ({
    index,
    h2dBytes: 1000,
    h2dSeconds: 0.001,
    computeSeconds: 0.001,
    prepareSeconds: 0,
    source: "host",
  })),
  stallSeconds: 0,
  startUs: 0,
  endUs: 0,
  events: [],
});

describe("job outputs within a stock client's message limit (issue 12)", () => {
  it("sends an output larger than a chunk as ordered chunks, then a result without it", () => {
    const output = randomBytes(2 * MiB + 5);
    const result = JobResult.fromPartial({
      jobId: "j",
      state: JobState.JOB_STATE_SUCCEEDED,
      output,
    });
    const messages = resultMessages(result, MiB);
    expect(messages.map((m) => m.event?.$case)).toEqual([
      "outputChunk",
      "outputChunk",
      "outputChunk",
      "result",
    ]);
    const assembler = new OutputAssembler();
    for (const m of messages.slice(0, -1)) {
      if (m.event?.$case === "outputChunk") assembler.add(m.event.value);
    }
    const last = messages[3].event;
    expect(last?.$case === "result" && last.value.output.length).toBe(0);
    expect(last?.$case === "result" && last.value.outputBytes).toBe(output.length);
    const whole = assembler.complete(last!.$case === "result" ? last!.value : result);
    expect(Buffer.compare(whole.output, output)).toBe(0);
    // A small output stays inline.
    const small = resultMessages({ ...result, output: Buffer.from([1, 2, 3, 4]) }, MiB);
    expect(small).toHaveLength(1);
  });

  it("refuses chunks out of order, overrunning, or missing", () => {
    const chunk = (offset: number, size: number, total: number) => ({
      jobId: "j",
      offset,
      data: Buffer.alloc(size),
      totalBytes: total,
    });
    const gap = new OutputAssembler();
    gap.add(chunk(0, 10, 30));
    expect(() => gap.add(chunk(20, 10, 30))).toThrow(/does not follow/);
    const over = new OutputAssembler();
    expect(() => over.add(chunk(0, 40, 30))).toThrow(/overruns/);
    const huge = new OutputAssembler();
    expect(() => huge.add(chunk(0, 1, 2 ** 40))).toThrow(/at most/);
    const short = new OutputAssembler();
    short.add(chunk(0, 10, 30));
    expect(() => short.complete(JobResult.fromPartial({ jobId: "j", outputBytes: 30 }))).toThrow(
      /10 came in chunks/,
    );
  });

  it("cuts a result's statistics to their limit, keeping the first and last steps", () => {
    const steps = Array.from({ length: 256 }, (_, i) => step(i + 1, 400));
    const result = JobResult.fromPartial({ jobId: "j", steps });
    const fitted = fitResultStats(result);
    expect(JobResult.encode(fitted).finish().length).toBeLessThanOrEqual(RESULT_STATS_LIMIT);
    expect(fitted.steps[0]).toEqual(steps[0]);
    expect(fitted.steps[fitted.steps.length - 1]).toEqual(steps[255]);
    expect(fitted.steps.length + fitted.stepsOmitted).toBe(256);
  });

  describe("through the server", () => {
    let dir: string;
    let modelPath: string;
    let server: SchedulerServer;

    beforeAll(async () => {
      dir = await mkdtemp(join(tmpdir(), "ferry-chunks-"));
      modelPath = join(dir, "tiny.safetensors");
      await genModel(modelPath, { blocks: 2, hidden: 32, heads: 2, channels: 4 });
      server = await startSchedulerServer({
        listen: "127.0.0.1:0",
        modelDirs: [dir],
        // A lenient deadline: this process is both the scheduler and the executor, and encodes
        // and decodes tens of MB on a shared machine while heartbeats wait behind them.
        heartbeatIntervalMs: 500,
        heartbeatMissLimit: 20,
        log: () => {},
      });
    });
    afterAll(async () => {
      await server?.close(100);
      await rm(dir, { recursive: true, force: true });
    });

    const spec = (seed: number): JobSpec =>
      JobSpec.fromPartial({
        modelPath,
        steps: 256,
        batch: 1,
        tokens: 8,
        seed,
        policy: "sdcpp",
      });

    it("delivers a 9 MB output and large statistics to a client with gRPC's default 4 MiB limit", async () => {
      const fake = new FakeExecutor(server.address, "big-output");
      const client = new SchedulerClient(server.address);
      // A stock client: grpc-js's default receive limit (4 MiB), no options.
      const stock = new SchedulerServiceClient(server.address, credentials.createInsecure());
      try {
        await fake.connect();
        const submitted = await client.submitJob(spec(1));
        const run = await fake.nextRun();
        const output = randomBytes(9 * MiB + 12);
        const steps = Array.from({ length: 256 }, (_, i) => step(i + 1, 400));
        // Before: one 9 MB result message, refused by a stock client ("larger than max").
        expect(
          JobResult.encode({ ...JobResult.fromPartial({ steps }), output }).finish().length,
        ).toBeGreaterThan(CLIENT_MESSAGE_LIMIT);
        fake.succeed(run.jobId, { output, steps });

        const received: WatchJobResponse[] = [];
        await new Promise<void>((done, fail) => {
          const call = stock.watchJob({ jobId: submitted.jobId, outputChunkBytes: 0 });
          call.on("data", (m: WatchJobResponse) => received.push(m));
          call.on("error", (e: ServiceError) => fail(e));
          call.on("end", () => done());
        });
        for (const m of received) {
          expect(WatchJobResponse.encode(m).finish().length).toBeLessThanOrEqual(
            CLIENT_MESSAGE_LIMIT,
          );
        }
        const chunks = received.flatMap((m) =>
          m.event?.$case === "outputChunk" ? [m.event.value.data] : [],
        );
        expect(chunks.length).toBeGreaterThan(1);
        expect(Buffer.compare(Buffer.concat(chunks), output)).toBe(0);
        const last = received[received.length - 1].event;
        expect(last?.$case).toBe("result");

        // The Ferry client puts it back together, and a larger chunk size may be asked for.
        const result = await client.watchJob(submitted.jobId);
        expect(result.state).toBe(JobState.JOB_STATE_SUCCEEDED);
        expect(Buffer.compare(result.output, output)).toBe(0);
        expect(result.steps[0].step).toBe(1);
        expect(result.steps[result.steps.length - 1].step).toBe(256);
        const bad = await new Promise<ServiceError>((done) => {
          const call = stock.watchJob({ jobId: submitted.jobId, outputChunkBytes: 10 });
          call.on("data", () => {});
          call.on("error", done);
        });
        expect(bad.details).toMatch(/output_chunk_bytes/);
      } finally {
        fake.close();
        client.close();
        stock.close();
      }
    });

    it("keeps a job whose executor floods progress faster than the scheduler reads it", async () => {
      // Issue 12: thousands of progress messages back to back held heartbeats behind them; the
      // executor was judged silent and its job re-queued. Every message is read and the job runs
      // once.
      const fake = new FakeExecutor(server.address, "flood");
      const client = new SchedulerClient(server.address);
      try {
        await fake.connect();
        const submitted = await client.submitJob(spec(2));
        const run = await fake.nextRun();
        fake.started(run.jobId);
        const stats = { ...step(0, 10), events: [] };
        for (let n = 1; n <= 3000; n++) {
          fake.send({
            $case: "jobUpdate",
            value: {
              update: {
                $case: "progress",
                value: { jobId: run.jobId, steps: 3000, stats: { ...stats, step: n } },
              },
            },
          });
        }
        fake.succeed(run.jobId);
        const result = await client.watchJob(submitted.jobId);
        expect(result.state).toBe(JobState.JOB_STATE_SUCCEEDED);
        const info = await client.getJob(submitted.jobId);
        expect(info.attempts).toBe(1);
        expect(info.lastStep).toBe(3000);
      } finally {
        fake.close();
        client.close();
      }
    });
  });
});

describe("the executor's outbound queue", () => {
  /** A stream that takes `room` writes, then reports itself full until drained. */
  class FullStream {
    written: ConnectRequest[] = [];
    room = 2;
    private listeners: (() => void)[] = [];
    on(event: string, listener: () => void) {
      if (event === "drain") this.listeners.push(listener);
      return this;
    }
    write(message: ConnectRequest): boolean {
      this.written.push(message);
      return --this.room > 0;
    }
    drain(room: number) {
      this.room = room;
      for (const l of this.listeners) l();
    }
  }
  const progress = (jobId: string, n: number): ConnectRequest["message"] => ({
    $case: "jobUpdate",
    value: {
      update: { $case: "progress", value: { jobId, steps: 10, stats: step(n) } },
    },
  });
  const what = (m: ConnectRequest) => {
    const x = m.message;
    if (x?.$case === "jobUpdate") {
      const u = x.value.update;
      return u?.$case === "progress" ? `p:${u.value.jobId}:${u.value.stats?.step}` : u?.$case;
    }
    return x?.$case;
  };

  it("keeps the newest progress per job and every result while the stream is full", () => {
    const stream = new FullStream();
    // eslint-disable-next-line @typescript-eslint/no-explicit-any
    const queue = new OutboundQueue(stream as any);
    queue.send(progress("a", 1));
    queue.send(progress("a", 2)); // full after this write
    queue.send(progress("a", 3));
    queue.send(progress("b", 1));
    queue.send({ $case: "heartbeat", value: { freeBytes: 1, holdings: undefined } });
    queue.send(progress("a", 4));
    queue.send({ $case: "heartbeat", value: { freeBytes: 2, holdings: undefined } });
    queue.send({
      $case: "jobUpdate",
      value: { update: { $case: "started", value: { jobId: "c" } } },
    });
    expect(queue.length).toBe(4);
    expect(queue.coalesced).toBe(2);
    stream.drain(100);
    expect(stream.written.map(what)).toEqual([
      "p:a:1",
      "p:a:2",
      "p:a:4",
      "p:b:1",
      "heartbeat",
      "started",
    ]);
    expect(queue.length).toBe(0);
  });
});
