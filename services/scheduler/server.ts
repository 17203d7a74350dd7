import {
  Server,
  ServerCredentials,
  type ServerUnaryCall,
  type ServerWritableStream,
  type sendUnaryData,
} from "@grpc/grpc-js";
import { propagation, ROOT_CONTEXT, type Context } from "@opentelemetry/api";
import {
  CancelJobResponse,
  GetPlanResponse,
  ListExecutorsResponse,
  SchedulerServiceService,
  SubmitJobResponse,
  type SchedulerServiceServer,
  type WatchJobRequest,
  type WatchJobResponse,
} from "../../gen/ferry/v1/scheduler";
import { Scheduler, type SchedulerOptions } from "./scheduler";
import { toStatusError } from "../../lib/wire/statusError";
import { GRPC_MESSAGE_LIMIT } from "../../lib/wire/limits";

export interface SchedulerServerOptions extends SchedulerOptions {
  /** HOST:PORT to listen on; port 0 picks a free one. @default "127.0.0.1:7400" */
  listen?: string;
}

type Lifecycle = "running" | "draining" | "stopped";

/** A running scheduler: the gRPC server over a Scheduler, with an orderly shutdown. */
export interface SchedulerServer {
  /** The address it listens on, with the real port. */
  address: string;
  port: number;
  scheduler: Scheduler;
  /** running → draining → stopped: stop taking jobs, wait for running ones, close streams. */
  close(graceMs?: number): Promise<void>;
}

function traceContextOf(call: { metadata: { getMap(): Record<string, unknown> } }): Context {
  const carrier: Record<string, string> = {};
  for (const [key, value] of Object.entries(call.metadata.getMap())) {
    if (typeof value === "string") carrier[key] = value;
  }
  return propagation.extract(ROOT_CONTEXT, carrier);
}

/** Runs a unary handler body, answering with its result or its mapped status error. */
function unary<Req, Res>(
  body: (call: ServerUnaryCall<Req, Res>) => Promise<Res>,
  log: (line: string) => void,
): (call: ServerUnaryCall<Req, Res>, callback: sendUnaryData<Res>) => void {
  return (call, callback) => {
    body(call).then(
      (response) => callback(null, response),
      (error) => callback(toStatusError(error, log)),
    );
  };
}

function serviceImplementation(scheduler: Scheduler, log: (line: string) => void) {
  const implementation: SchedulerServiceServer = {
    connect: (stream) => scheduler.attachExecutor(stream),

    submitJob: unary(async (call) => {
      const job = await scheduler.submit(call.request.spec, traceContextOf(call));
      const executor = scheduler.listExecutors().find((e) => e.executorId === job.executorId);
      return SubmitJobResponse.fromPartial({
        jobId: job.id,
        executorId: job.executorId,
        plan: job.plan,
        device: executor?.device,
      });
    }, log),

    watchJob: (call: ServerWritableStream<WatchJobRequest, WatchJobResponse>) => {
      let job;
      try {
        job = scheduler.getJob(call.request.jobId);
      } catch (error) {
        // grpc-js sends an 'error' event's status to the client and ends the call.
        call.emit("error", toStatusError(error, log));
        return;
      }
      for (const event of job.history()) call.write(event);
      if (job.finished) {
        call.end();
        return;
      }
      const onEvent = (event: WatchJobResponse) => {
        call.write(event);
        if (event.event?.$case === "result") {
          job.events.off("event", onEvent);
          call.end();
        }
      };
      job.events.on("event", onEvent);
      call.on("cancelled", () => job.events.off("event", onEvent));
    },

    cancelJob: unary(
      async (call) =>
        CancelJobResponse.fromPartial({ state: scheduler.cancel(call.request.jobId) }),
      log,
    ),

    getPlan: unary(async (call) => {
      const { plan, executor } = await scheduler.getPlan(call.request.spec);
      // The device as it was planned for: calibrated rates, not only the registered ones.
      return GetPlanResponse.fromPartial({
        plan,
        executorId: executor.id,
        device: executor.info().calibrated,
      });
    }, log),

    listExecutors: unary(
      async () => ListExecutorsResponse.fromPartial({ executors: scheduler.listExecutors() }),
      log,
    ),
  };
  return implementation;
}

/** Starts the scheduler's gRPC server. */
export async function startSchedulerServer(
  options: SchedulerServerOptions = {},
): Promise<SchedulerServer> {
  const log = options.log ?? ((line: string) => console.error(line));
  const listen = options.listen ?? "127.0.0.1:7400";
  const scheduler = new Scheduler({ ...options, log });
  const server = new Server({
    "grpc.max_receive_message_length": GRPC_MESSAGE_LIMIT,
    "grpc.max_send_message_length": GRPC_MESSAGE_LIMIT,
  });
  server.addService(SchedulerServiceService, serviceImplementation(scheduler, log));
  const port = await new Promise<number>((resolvePort, reject) => {
    server.bindAsync(listen, ServerCredentials.createInsecure(), (error, boundPort) =>
      error
        ? reject(new Error(`cannot listen on ${listen}: ${error.message}`))
        : resolvePort(boundPort),
    );
  });
  const host = listen.slice(0, listen.lastIndexOf(":")) || "127.0.0.1";
  let lifecycle: Lifecycle = "running";
  return {
    address: `${host}:${port}`,
    port,
    scheduler,
    async close(graceMs = 5000) {
      if (lifecycle !== "running") return;
      lifecycle = "draining";
      await scheduler.drain(graceMs);
      await new Promise<void>((done) => {
        const force = setTimeout(() => {
          server.forceShutdown();
          done();
        }, 2000);
        server.tryShutdown(() => {
          clearTimeout(force);
          done();
        });
      });
      lifecycle = "stopped";
    },
  };
}
