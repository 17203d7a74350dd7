import { Metadata, status, type ChannelOptions, type ServiceError } from "@grpc/grpc-js";
import { context, propagation } from "@opentelemetry/api";
import {
  JobState,
  SchedulerServiceClient,
  type GetPlanResponse,
  type JobInfo,
  type JobProgress,
  type JobResult,
  type JobSpec,
  type ListExecutorsResponse,
  type SetBudgetResponse,
  type ListJobsResponse,
  type LoadModelResponse,
  type ModelInfo,
  type SubmitJobResponse,
  type WatchJobResponse,
} from "../../gen/ferry/v1/scheduler";
import { bearerInterceptor, channelCredentials, type ClientTlsFiles } from "../wire/credentials";
import { GRPC_MESSAGE_LIMIT } from "../wire/limits";
import { OutputAssembler } from "../wire/outputChunks";

/** The error a failed call or job gives: the gRPC status code name and the server's message. */
export class FerryClientError extends Error {
  override name = "FerryClientError";
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

function fromServiceError(error: ServiceError): FerryClientError {
  return new FerryClientError(status[error.code] ?? "UNKNOWN", error.details || error.message);
}

/** Carries the active trace context to the scheduler (W3C traceparent in gRPC metadata). */
function traceMetadata(): Metadata {
  const metadata = new Metadata();
  const carrier: Record<string, string> = {};
  propagation.inject(context.active(), carrier);
  for (const [key, value] of Object.entries(carrier)) metadata.set(key, value);
  return metadata;
}

export interface SchedulerClientOptions {
  /** Sent as `authorization: Bearer <token>` with every call. @default undefined */
  token?: string;
  /** TLS to the scheduler. @default undefined (plaintext) */
  tls?: ClientTlsFiles;
  /** Deadline of each unary call, ms (watches have none). @default 30_000 */
  deadlineMs?: number;
  /**
   * More grpc-js channel options, e.g. `{ "grpc.use_local_subchannel_pool": 1 }` for a
   * connection of its own (clients in one process otherwise share one). @default {}
   */
  channelOptions?: ChannelOptions;
}

export interface SubmitOptions {
  /** Higher runs first, in [-1000, 1000]. @default 0 */
  priority?: number;
  /** A retried submit with the same key returns the same job. @default "" (none) */
  idempotencyKey?: string;
}

/** A promise-based client of the scheduler's API. */
export class SchedulerClient {
  private readonly client: SchedulerServiceClient;
  private readonly deadlineMs: number;

  constructor(
    readonly address: string,
    options: SchedulerClientOptions = {},
  ) {
    this.deadlineMs = options.deadlineMs ?? 30_000;
    this.client = new SchedulerServiceClient(address, channelCredentials(options.tls), {
      ...options.channelOptions,
      "grpc.max_receive_message_length": GRPC_MESSAGE_LIMIT,
      "grpc.max_send_message_length": GRPC_MESSAGE_LIMIT,
      interceptors: options.token ? [bearerInterceptor(options.token)] : [],
    });
  }

  private callOptions() {
    return { deadline: Date.now() + this.deadlineMs };
  }

  /** Waits until the channel is connected, failing clearly if the scheduler is unreachable. */
  async ready(timeoutMs = 5000): Promise<void> {
    await new Promise<void>((resolveReady, reject) =>
      this.client.waitForReady(Date.now() + timeoutMs, (error) =>
        error
          ? reject(
              new FerryClientError(
                "UNAVAILABLE",
                `cannot reach the scheduler at ${this.address} (is \`ferry serve\` running?)`,
              ),
            )
          : resolveReady(),
      ),
    );
  }

  submitJob(spec: JobSpec, options: SubmitOptions = {}): Promise<SubmitJobResponse> {
    return new Promise((resolveCall, reject) =>
      this.client.submitJob(
        { spec, priority: options.priority ?? 0, idempotencyKey: options.idempotencyKey ?? "" },
        traceMetadata(),
        this.callOptions(),
        (error, response) => (error ? reject(fromServiceError(error)) : resolveCall(response)),
      ),
    );
  }

  getPlan(spec: JobSpec): Promise<GetPlanResponse> {
    return new Promise((resolveCall, reject) =>
      this.client.getPlan({ spec }, traceMetadata(), this.callOptions(), (error, response) =>
        error ? reject(fromServiceError(error)) : resolveCall(response),
      ),
    );
  }

  cancelJob(jobId: string): Promise<JobState> {
    return new Promise((resolveCall, reject) =>
      this.client.cancelJob({ jobId }, new Metadata(), this.callOptions(), (error, response) =>
        error ? reject(fromServiceError(error)) : resolveCall(response.state),
      ),
    );
  }

  getJob(jobId: string): Promise<JobInfo> {
    return new Promise((resolveCall, reject) =>
      this.client.getJob({ jobId }, new Metadata(), this.callOptions(), (error, response) =>
        error ? reject(fromServiceError(error)) : resolveCall(response.job!),
      ),
    );
  }

  listJobs(
    options: { states?: JobState[]; pageSize?: number; pageToken?: string } = {},
  ): Promise<ListJobsResponse> {
    return new Promise((resolveCall, reject) =>
      this.client.listJobs(
        {
          states: options.states ?? [],
          pageSize: options.pageSize ?? 0,
          pageToken: options.pageToken ?? "",
        },
        new Metadata(),
        this.callOptions(),
        (error, response) => (error ? reject(fromServiceError(error)) : resolveCall(response)),
      ),
    );
  }

  listExecutors(): Promise<ListExecutorsResponse> {
    return new Promise((resolveCall, reject) =>
      this.client.listExecutors({}, new Metadata(), this.callOptions(), (error, response) =>
        error ? reject(fromServiceError(error)) : resolveCall(response),
      ),
    );
  }

  listModels(): Promise<ModelInfo[]> {
    return new Promise((resolveCall, reject) =>
      this.client.listModels({}, new Metadata(), this.callOptions(), (error, response) =>
        error ? reject(fromServiceError(error)) : resolveCall(response.models),
      ),
    );
  }

  loadModel(
    model: string,
    options: { executorId?: string; resident?: boolean } = {},
  ): Promise<LoadModelResponse> {
    return new Promise((resolveCall, reject) =>
      this.client.loadModel(
        { model, executorId: options.executorId ?? "", resident: options.resident ?? false },
        new Metadata(),
        this.callOptions(),
        (error, response) => (error ? reject(fromServiceError(error)) : resolveCall(response)),
      ),
    );
  }

  unloadModel(model: string, executorId = ""): Promise<string[]> {
    return new Promise((resolveCall, reject) =>
      this.client.unloadModel(
        { model, executorId },
        new Metadata(),
        this.callOptions(),
        (error, response) =>
          error ? reject(fromServiceError(error)) : resolveCall(response.executorIds),
      ),
    );
  }

  /**
   * Sets an executor's device memory budget: idle models' cached weights over it are evicted at
   * once, and its running jobs swap to plans that fit at their next step boundary.
   */
  setBudget(executorId: string, budgetBytes: number): Promise<SetBudgetResponse> {
    return new Promise((resolveCall, reject) =>
      this.client.setBudget(
        { executorId, budgetBytes },
        new Metadata(),
        this.callOptions(),
        (error, response) => (error ? reject(fromServiceError(error)) : resolveCall(response)),
      ),
    );
  }

  /**
   * Follows a job to its end: calls `onProgress` per step and resolves with the result (whatever
   * its state). Rejects only if the watch itself fails.
   */
  watchJob(
    jobId: string,
    onProgress: (progress: JobProgress) => void = () => {},
  ): Promise<JobResult> {
    return new Promise((resolveWatch, reject) => {
      const call = this.client.watchJob({ jobId, outputChunkBytes: 0 });
      let result: JobResult | undefined;
      let failure: FerryClientError | undefined;
      // A large output comes in chunks before the result; the result then carries none.
      const output = new OutputAssembler();
      call.on("data", (response: WatchJobResponse) => {
        const event = response.event;
        if (event?.$case === "progress") {
          onProgress(event.value);
          return;
        }
        try {
          if (event?.$case === "outputChunk") output.add(event.value);
          else if (event?.$case === "result") result = output.complete(event.value);
        } catch (error) {
          failure ??= new FerryClientError("DATA_LOSS", (error as Error).message);
          call.cancel();
        }
      });
      call.on("error", (error: ServiceError) => reject(failure ?? fromServiceError(error)));
      call.on("end", () =>
        failure
          ? reject(failure)
          : result
            ? resolveWatch(result)
            : reject(
                new FerryClientError("UNKNOWN", `the watch of ${jobId} ended without a result`),
              ),
      );
    });
  }

  /**
   * {@link watchJob}, watching again while the scheduler is unavailable (restarting) for up to
   * `patienceMs` in a row.
   */
  async watchUntilDone(
    jobId: string,
    onProgress?: (progress: JobProgress) => void,
    patienceMs = 60_000,
  ): Promise<JobResult> {
    let since = Date.now();
    let delayMs = 100;
    for (;;) {
      try {
        return await this.watchJob(jobId, (progress) => {
          since = Date.now();
          onProgress?.(progress);
        });
      } catch (error) {
        const code = (error as FerryClientError).code;
        if (code !== "UNAVAILABLE" || Date.now() - since > patienceMs) throw error;
        await new Promise((done) => setTimeout(done, delayMs));
        delayMs = Math.min(delayMs * 2, 2000);
      }
    }
  }

  /** Submits, follows and returns a successful job's result; a failed job rejects with its error. */
  async runJob(
    spec: JobSpec,
    onProgress?: (progress: JobProgress) => void,
    onSubmitted?: (submitted: SubmitJobResponse) => void,
    options: SubmitOptions = {},
  ): Promise<JobResult> {
    const submitted = await this.submitJob(spec, options);
    onSubmitted?.(submitted);
    const result = await this.watchUntilDone(submitted.jobId, onProgress);
    if (result.state !== JobState.JOB_STATE_SUCCEEDED) {
      throw new FerryClientError(
        result.error?.code || JobState[result.state],
        result.error?.message || `job ${submitted.jobId} ended in ${JobState[result.state]}`,
      );
    }
    return result;
  }

  close(): void {
    this.client.close();
  }
}
