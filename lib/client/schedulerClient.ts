import { credentials, Metadata, status, type ServiceError } from "@grpc/grpc-js";
import { context, propagation } from "@opentelemetry/api";
import {
  JobState,
  SchedulerServiceClient,
  type GetPlanResponse,
  type JobProgress,
  type JobResult,
  type JobSpec,
  type ListExecutorsResponse,
  type SubmitJobResponse,
  type WatchJobResponse,
} from "../../gen/ferry/v1/scheduler";

const MESSAGE_LIMIT = 256 * 1024 * 1024;

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

/** A promise-based client of the scheduler's API. */
export class SchedulerClient {
  private readonly client: SchedulerServiceClient;

  constructor(readonly address: string) {
    this.client = new SchedulerServiceClient(address, credentials.createInsecure(), {
      "grpc.max_receive_message_length": MESSAGE_LIMIT,
      "grpc.max_send_message_length": MESSAGE_LIMIT,
    });
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

  submitJob(spec: JobSpec): Promise<SubmitJobResponse> {
    return new Promise((resolveCall, reject) =>
      this.client.submitJob({ spec }, traceMetadata(), (error, response) =>
        error ? reject(fromServiceError(error)) : resolveCall(response),
      ),
    );
  }

  getPlan(spec: JobSpec): Promise<GetPlanResponse> {
    return new Promise((resolveCall, reject) =>
      this.client.getPlan({ spec }, traceMetadata(), (error, response) =>
        error ? reject(fromServiceError(error)) : resolveCall(response),
      ),
    );
  }

  cancelJob(jobId: string): Promise<JobState> {
    return new Promise((resolveCall, reject) =>
      this.client.cancelJob({ jobId }, (error, response) =>
        error ? reject(fromServiceError(error)) : resolveCall(response.state),
      ),
    );
  }

  listExecutors(): Promise<ListExecutorsResponse> {
    return new Promise((resolveCall, reject) =>
      this.client.listExecutors({}, (error, response) =>
        error ? reject(fromServiceError(error)) : resolveCall(response),
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
      const call = this.client.watchJob({ jobId });
      let result: JobResult | undefined;
      call.on("data", (response: WatchJobResponse) => {
        const event = response.event;
        if (event?.$case === "progress") onProgress(event.value);
        else if (event?.$case === "result") result = event.value;
      });
      call.on("error", (error: ServiceError) => reject(fromServiceError(error)));
      call.on("end", () =>
        result
          ? resolveWatch(result)
          : reject(new FerryClientError("UNKNOWN", `the watch of ${jobId} ended without a result`)),
      );
    });
  }

  /** Submits, follows and returns a successful job's result; a failed job rejects with its error. */
  async runJob(
    spec: JobSpec,
    onProgress?: (progress: JobProgress) => void,
    onSubmitted?: (submitted: SubmitJobResponse) => void,
  ): Promise<JobResult> {
    const submitted = await this.submitJob(spec);
    onSubmitted?.(submitted);
    const result = await this.watchJob(submitted.jobId, onProgress);
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
