import {
  Server,
  status,
  type ServerUnaryCall,
  type ServerWritableStream,
  type sendUnaryData,
} from "@grpc/grpc-js";
import { ReflectionService } from "@grpc/reflection";
import { HealthImplementation } from "grpc-health-check";
import { propagation, ROOT_CONTEXT, type Context } from "@opentelemetry/api";
import {
  CancelJobResponse,
  GetJobResponse,
  GetPlanResponse,
  ListExecutorsResponse,
  ListJobsResponse,
  ListModelsResponse,
  LoadModelResponse,
  SchedulerServiceService,
  SetBudgetResponse,
  SubmitJobResponse,
  UnloadModelResponse,
  type JobResult,
  type SchedulerServiceServer,
  type WatchJobRequest,
  type WatchJobResponse,
} from "../../gen/ferry/v1/scheduler";
import {
  serverCredentials,
  tokenInterceptor,
  type ServerTlsFiles,
} from "../../lib/wire/credentials";
import {
  DEFAULT_OUTPUT_CHUNK_BYTES,
  GRPC_MESSAGE_LIMIT,
  MAX_OUTPUT_CHUNK_BYTES,
  MIN_OUTPUT_CHUNK_BYTES,
} from "../../lib/wire/limits";
import { bindServer } from "../../lib/wire/listen";
import { resultMessages } from "../../lib/wire/outputChunks";
import { checkInteger } from "../../lib/wire/validate";
import { ferryPackageDefinition } from "../../lib/wire/protoDefinition";
import { checkDecoded, tolerantDecoding } from "../../lib/wire/decoding";
import { StatusError, toStatusError } from "../../lib/wire/statusError";
import type { ExecutorStream } from "./executors";
import { JobStore } from "./jobStore";
import { ModelRepository } from "./modelRepository";
import { Scheduler, type SchedulerOptions } from "./scheduler";

export interface SchedulerServerOptions extends Omit<SchedulerOptions, "store" | "models"> {
  /** HOST:PORT to listen on; port 0 picks a free one. @default "127.0.0.1:7400" */
  listen?: string;
  /** The job database; ":memory:" keeps nothing across restarts. @default ":memory:" */
  db?: string;
  /** The model repository's directories. @default [] (no models: jobs are refused) */
  modelDirs?: readonly string[];
  /** Clients and executors must send this bearer token. @default undefined (no token) */
  token?: string;
  /** Serve TLS (and verify executors' client certificates). @default undefined (plaintext) */
  tls?: ServerTlsFiles;
}

type Lifecycle = "running" | "draining" | "stopped";

/** A running scheduler: the gRPC server over a Scheduler, with an orderly shutdown. */
export interface SchedulerServer {
  /** The address it listens on, with the real port. */
  address: string;
  port: number;
  scheduler: Scheduler;
  /**
   * running → draining → stopped: health turns NOT_SERVING, new jobs are refused, running jobs
   * get `graceMs` to finish, then streams close and the database is closed.
   */
  close(graceMs?: number): Promise<void>;
}

const SERVICE_NAME = "ferry.v1.SchedulerService";

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
    Promise.resolve()
      .then(() => {
        // A call whose deadline passed before it arrived is not carried out: the caller has
        // already been told DEADLINE_EXCEEDED, so a change it asked for must not happen.
        const deadline = call.getDeadline();
        const deadlineMs = deadline instanceof Date ? deadline.getTime() : Number(deadline);
        if (Number.isFinite(deadlineMs) && deadlineMs <= Date.now()) {
          throw new StatusError(status.DEADLINE_EXCEEDED, "the call's deadline had passed");
        }
        checkDecoded(call.request);
        return body(call);
      })
      .then(
        (response) => callback(null, response),
        (error) => callback(toStatusError(error, log)),
      );
  };
}

/**
 * Writes messages in order, waiting for each write to drain before the next; false when the
 * call ended (the watcher went away) before all were written.
 */
async function writeInOrder(
  call: ServerWritableStream<WatchJobRequest, WatchJobResponse>,
  messages: readonly WatchJobResponse[],
): Promise<boolean> {
  for (const message of messages) {
    if (call.cancelled || call.destroyed) return false;
    if (!call.write(message)) {
      const open = await new Promise<boolean>((resume) => {
        const done = (value: boolean) => {
          call.off("drain", drained);
          call.off("close", closed);
          call.off("cancelled", closed);
          resume(value);
        };
        const drained = () => done(true);
        const closed = () => done(false);
        call.on("drain", drained);
        call.on("close", closed);
        call.on("cancelled", closed);
      });
      if (!open) return false;
    }
  }
  return !call.cancelled && !call.destroyed;
}

/** Ends a server stream with a status (grpc-js sends an 'error' event's status and closes). */
function failStream(
  call: { emit(event: "error", error: Error): boolean },
  error: unknown,
  log: (line: string) => void,
) {
  call.emit("error", toStatusError(error, log));
}

function serviceImplementation(
  scheduler: Scheduler,
  log: (line: string) => void,
  requireExecutorCertificate: boolean,
): SchedulerServiceServer {
  return {
    connect: (stream: ExecutorStream) => {
      if (requireExecutorCertificate && !stream.getAuthContext().sslPeerCertificate) {
        failStream(
          stream,
          new StatusError(
            status.UNAUTHENTICATED,
            "executors must present a client certificate signed by the scheduler's --tls-client-ca",
          ),
          log,
        );
        return;
      }
      scheduler.attachExecutor(stream);
    },

    submitJob: unary(async (call) => {
      const outcome = await scheduler.submit(
        call.request,
        traceContextOf(call),
        () => call.cancelled,
      );
      return SubmitJobResponse.fromPartial({
        jobId: outcome.job.id,
        executorId: outcome.executorId,
        plan: outcome.plan,
        device: outcome.device,
        state: outcome.job.state,
        existing: outcome.existing,
      });
    }, log),

    watchJob: (call: ServerWritableStream<WatchJobRequest, WatchJobResponse>) => {
      let job;
      let chunkBytes: number;
      try {
        checkDecoded(call.request);
        job = scheduler.getJob(call.request.jobId);
        // 0 asks for the default.
        const asked = call.request.outputChunkBytes;
        if (asked !== 0) {
          checkInteger("output_chunk_bytes", asked, MIN_OUTPUT_CHUNK_BYTES, MAX_OUTPUT_CHUNK_BYTES);
        }
        chunkBytes = asked || DEFAULT_OUTPUT_CHUNK_BYTES;
      } catch (error) {
        failStream(call, error, log);
        return;
      }
      // The result: its output in chunks when it is bigger than one, each written once the
      // previous one has drained, so a slow watcher holds the output once, not copies of it.
      const sendResult = (result: JobResult) => {
        void writeInOrder(call, resultMessages(result, chunkBytes)).then((open) => {
          if (open) call.end();
        });
      };
      for (const event of job.history()) call.write(event);
      if (job.finished) {
        sendResult(scheduler.resultOf(job));
        return;
      }
      const stop = () => {
        job.events.off("event", onEvent);
        job.events.off("shutdown", onShutdown);
      };
      const onEvent = (event: WatchJobResponse) => {
        if (event.event?.$case === "result") {
          stop();
          sendResult(event.event.value);
          return;
        }
        call.write(event);
      };
      const onShutdown = () => {
        stop();
        failStream(
          call,
          new StatusError(
            status.UNAVAILABLE,
            "the scheduler is restarting; the job is kept: watch it again once it is back",
          ),
          log,
        );
      };
      job.events.on("event", onEvent);
      job.events.on("shutdown", onShutdown);
      call.on("cancelled", stop);
      call.on("close", stop);
    },

    cancelJob: unary(
      async (call) =>
        CancelJobResponse.fromPartial({ state: scheduler.cancel(call.request.jobId) }),
      log,
    ),

    getJob: unary(
      async (call) =>
        GetJobResponse.fromPartial({ job: scheduler.getJob(call.request.jobId).info() }),
      log,
    ),

    listJobs: unary(async (call) => {
      const { states, pageSize, pageToken } = call.request;
      return ListJobsResponse.fromPartial(scheduler.listJobs(states, pageSize, pageToken));
    }, log),

    getPlan: unary(async (call) => {
      const { plan, executorId, multiGpu } = await scheduler.getPlan(call.request.spec);
      // The device as it was planned for: calibrated rates, not only the registered ones.
      return GetPlanResponse.fromPartial({
        plan,
        executorId,
        multiGpu,
        device: scheduler.calibratedDeviceOf(executorId),
      });
    }, log),

    listExecutors: unary(
      async () => ListExecutorsResponse.fromPartial({ executors: scheduler.listExecutors() }),
      log,
    ),

    listModels: unary(
      async () => ListModelsResponse.fromPartial({ models: await scheduler.listModels() }),
      log,
    ),

    loadModel: unary(async (call) => {
      const { model, executorId, resident } = call.request;
      return LoadModelResponse.fromPartial(await scheduler.loadModel(model, executorId, resident));
    }, log),

    unloadModel: unary(async (call) => {
      const { model, executorId } = call.request;
      return UnloadModelResponse.fromPartial({
        executorIds: await scheduler.unloadModel(model, executorId),
      });
    }, log),

    setBudget: unary(async (call) => {
      const { executorId, budgetBytes } = call.request;
      const result = await scheduler.setBudget(executorId, budgetBytes);
      return SetBudgetResponse.fromPartial({
        executor: result.executor,
        replannedJobIds: result.replanned,
        unchangedJobIds: result.unchanged,
      });
    }, log),
  };
}

/** Starts the scheduler's gRPC server (with health checking and reflection). */
export async function startSchedulerServer(
  options: SchedulerServerOptions = {},
): Promise<SchedulerServer> {
  const log = options.log ?? ((line: string) => console.error(line));
  const listen = options.listen ?? "127.0.0.1:7400";
  const models = await ModelRepository.open(options.modelDirs ?? []);
  const credentials = serverCredentials(options.tls);
  const store = new JobStore(options.db ?? ":memory:");
  const scheduler = new Scheduler({ ...options, log, store, models });
  const server = new Server({
    "grpc.max_receive_message_length": GRPC_MESSAGE_LIMIT,
    "grpc.max_send_message_length": GRPC_MESSAGE_LIMIT,
    interceptors: options.token ? [tokenInterceptor(options.token)] : [],
  });
  server.addService(
    tolerantDecoding(SchedulerServiceService),
    serviceImplementation(scheduler, log, Boolean(options.tls?.clientCaFile)),
  );
  const health = new HealthImplementation({ "": "SERVING", [SERVICE_NAME]: "SERVING" });
  health.addToServer(server);
  new ReflectionService(ferryPackageDefinition()).addToServer(server);
  let address: string;
  try {
    address = await bindServer(server, listen, credentials);
  } catch (error) {
    await scheduler.drain(0);
    throw error;
  }
  let lifecycle: Lifecycle = "running";
  return {
    address,
    port: Number(address.slice(address.lastIndexOf(":") + 1)),
    scheduler,
    async close(graceMs = 5000) {
      if (lifecycle !== "running") return;
      lifecycle = "draining";
      health.setStatus("", "NOT_SERVING");
      health.setStatus(SERVICE_NAME, "NOT_SERVING");
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
