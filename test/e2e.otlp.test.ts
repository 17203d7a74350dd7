import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { genModel } from "../lib/model/genModel";
import { startOtlpReceiver, type OtlpReceiver } from "../lib/telemetry/otlpReceiver";
import type { TraceSpan } from "../lib/telemetry/traceReport";
import { runFerry, startExecutor, startServe, type FerryProcess } from "./helpers/ferryProcesses";

// Real processes (ferry serve, ferry executor, ferry run) export over OTLP, configured only by
// the standard OTEL_* variables, to a receiver in this test: one trace per job, parents intact.
describe.each(["grpc", "http/protobuf"] as const)("OTLP over %s", (protocol) => {
  let dir: string;
  let modelPath: string;
  let receiver: OtlpReceiver;
  let env: NodeJS.ProcessEnv;
  const processes: FerryProcess[] = [];
  let address: string;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "ferry-otlp-"));
    modelPath = join(dir, "tiny.safetensors");
    await genModel(modelPath, { blocks: 3, hidden: 64, heads: 4, channels: 8, seed: 7 });
    receiver = await startOtlpReceiver();
    env = {
      FERRY_TRACE_FILE: "",
      OTEL_TRACES_EXPORTER: "otlp",
      OTEL_EXPORTER_OTLP_PROTOCOL: protocol,
      OTEL_EXPORTER_OTLP_ENDPOINT:
        protocol === "grpc" ? receiver.grpcEndpoint : receiver.httpEndpoint,
      // Export within a tenth of a second rather than the default five.
      OTEL_BSP_SCHEDULE_DELAY: "100",
    };
    const serve = await startServe(["--model-dir", dir], env);
    processes.push(serve.process);
    address = serve.address;
    const executor = await startExecutor(address, "otlp-gpu0", [], env);
    processes.push(executor.process);
  }, 60_000);

  afterAll(async () => {
    for (const process of processes.reverse()) await process.stop();
    await receiver?.close();
    await rm(dir, { recursive: true, force: true });
  });

  it("one trace per job across client, scheduler and executor, cold then warm", async () => {
    const run = await runFerry(
      [
        "run",
        "--scheduler",
        address,
        "--model",
        modelPath,
        "--steps",
        "3",
        "--batch",
        "2",
        "--tokens",
        "16",
        "--policy",
        "ferry",
        "--max-vram",
        String(0.6 / 1024),
        "--params-backend",
        "cpu",
        "--load",
        "lazy",
        "--json",
      ],
      env,
    );
    expect(run.stderr).not.toMatch(/ferry run:/);
    expect(run.code).toBe(0);
    const result = JSON.parse(run.stdout) as {
      job_id: string;
      plan: { segments: { index: number; param_bytes: number; resident: boolean }[] };
    };
    const jobSpans = (spans: TraceSpan[]) => {
      const root = spans.find((s) => s.name === "ferry.run");
      return root ? spans.filter((s) => s.traceId === root.traceId) : [];
    };
    const spans = jobSpans(
      await receiver.waitFor((all) => {
        const mine = jobSpans(all);
        return (
          mine.some((s) => s.name === "ferry.job") &&
          mine.filter((s) => s.name === "ferry.step").length === 3
        );
      }),
    );
    expect(receiver.requests[protocol === "grpc" ? "grpc" : "http"]).toBeGreaterThan(0);
    expect(receiver.requests[protocol === "grpc" ? "http" : "grpc"]).toBe(0);

    // The chain: ferry.run (client) → ferry.job (scheduler) → ferry.step (executor) →
    // ferry.segment → prepare_params / h2d / compute.
    const byId = new Map(spans.map((s) => [s.spanId, s]));
    const [runSpan] = spans.filter((s) => s.name === "ferry.run");
    const jobs = spans.filter((s) => s.name === "ferry.job");
    expect(jobs).toHaveLength(1);
    expect(runSpan.parentSpanId).toBe("");
    expect(runSpan.resource["service.name"]).toBe("ferry-client");
    expect(runSpan.attributes["ferry.job.id"]).toBe(result.job_id);
    expect(jobs[0].parentSpanId).toBe(runSpan.spanId);
    expect(jobs[0].resource["service.name"]).toBe("ferry-scheduler");
    expect(jobs[0].attributes["ferry.policy"]).toBe("ferry");
    const steps = spans.filter((s) => s.name === "ferry.step");
    for (const step of steps) {
      expect(step.parentSpanId).toBe(jobs[0].spanId);
      expect(step.resource).toMatchObject({
        "service.name": "ferry-executor",
        "service.instance.id": "otlp-gpu0",
        "ferry.executor.id": "otlp-gpu0",
        "ferry.device.name": "cpu",
      });
      expect(step.attributes).toMatchObject({
        "ferry.job.id": result.job_id,
        "ferry.policy": "ferry",
        "ferry.device": "cpu",
      });
      expect(step.attributes["ferry.stall_s"]).toBeGreaterThanOrEqual(0);
    }
    for (const span of spans) {
      if (span.name === "ferry.segment")
        expect(byId.get(span.parentSpanId)?.name).toBe("ferry.step");
      if (["ferry.prepare_params", "ferry.h2d", "ferry.compute"].includes(span.name)) {
        expect(byId.get(span.parentSpanId)?.name).toBe("ferry.segment");
      }
    }

    // Cold then warm: step 1 reads each segment from disk, later steps find it in host memory.
    const stepOf = (span: TraceSpan): number => {
      for (let up = byId.get(span.parentSpanId); up; up = byId.get(up.parentSpanId)) {
        if (up.name === "ferry.step") return Number(up.attributes["ferry.step"]);
      }
      return -1;
    };
    const prepares = spans.filter((s) => s.name === "ferry.prepare_params");
    const firstPrepares = prepares.filter((s) => stepOf(s) === 1);
    expect(firstPrepares.length).toBe(result.plan.segments.length);
    for (const span of firstPrepares) {
      expect(span.attributes).toMatchObject({ "ferry.cold": true, "ferry.source": "disk" });
    }
    for (const span of prepares.filter((s) => stepOf(s) > 1)) {
      expect(span.attributes["ferry.cold"]).toBe(false);
      expect(span.attributes["ferry.source"]).not.toBe("disk");
    }
    // Streamed segments: one h2d per step carrying the segment's bytes; resident ones are
    // uploaded in step 1 at most.
    const copies = spans.filter((s) => s.name === "ferry.h2d");
    for (const segment of result.plan.segments) {
      const own = copies.filter((s) => s.attributes["ferry.segment.index"] === segment.index);
      if (segment.resident) {
        expect(own.every((s) => stepOf(s) === 1)).toBe(true);
        expect(own.length).toBeLessThanOrEqual(1);
      } else {
        expect(own.map(stepOf).sort()).toEqual([1, 2, 3]);
        for (const span of own) {
          expect(span.attributes["ferry.bytes"]).toBe(segment.param_bytes);
          const hidden = Number(span.attributes["ferry.hidden_fraction"]);
          expect(hidden).toBeGreaterThanOrEqual(0);
          expect(hidden).toBeLessThanOrEqual(1);
        }
      }
    }
    expect(result.plan.segments.some((segment) => !segment.resident)).toBe(true);
  }, 60_000);
});
