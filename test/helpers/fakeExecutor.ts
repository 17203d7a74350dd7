import { randomUUID } from "node:crypto";
import { credentials, Metadata, type ClientDuplexStream, type ServiceError } from "@grpc/grpc-js";
import {
  ConnectRequest,
  JobResult,
  JobState,
  SchedulerServiceClient,
  type ConnectResponse,
  type DeviceInfo,
  type Holdings,
  type RunJob,
} from "../../gen/ferry/v1/scheduler";

/**
 * A scripted executor speaking the Connect protocol over a real gRPC stream, with no device:
 * what a test needs to drive the scheduler step by step (or to play an impostor).
 */
export class FakeExecutor {
  readonly client: SchedulerServiceClient;
  stream: ClientDuplexStream<ConnectRequest, ConnectResponse> | undefined;
  readonly received: ConnectResponse[] = [];
  readonly runs: RunJob[] = [];
  error: ServiceError | undefined;
  ended = false;
  private heartbeat: NodeJS.Timeout | undefined;
  private waiters: (() => void)[] = [];
  running: string[] = [];
  heldResults: string[] = [];
  models: Holdings["models"] = [];

  constructor(
    readonly address: string,
    readonly id: string,
    readonly instance: string = randomUUID(),
    readonly device: Partial<DeviceInfo> = {},
    private readonly token?: string,
  ) {
    this.client = new SchedulerServiceClient(address, credentials.createInsecure());
  }

  holdings(): Holdings {
    return {
      freeBytes: 1 << 30,
      usedBytes: 0,
      residentBytes: 0,
      residentSegments: 0,
      models: this.models,
      runningJobIds: this.running,
      heldResultJobIds: this.heldResults,
      budgetBytes: 0,
    };
  }

  /** Opens the stream and registers; resolves on Registered, rejects on the stream's error. */
  connect(heartbeatMs = 100): Promise<void> {
    const metadata = new Metadata();
    if (this.token) metadata.set("authorization", `Bearer ${this.token}`);
    const stream = this.client.connect(metadata);
    this.stream = stream;
    this.ended = false;
    this.error = undefined;
    const registered = new Promise<void>((resolve, reject) => {
      stream.on("data", (message: ConnectResponse) => {
        this.received.push(message);
        if (message.message?.$case === "registered") resolve();
        if (message.message?.$case === "runJob") this.runs.push(message.message.value);
        for (const wake of this.waiters.splice(0)) wake();
      });
      stream.on("error", (error: ServiceError) => {
        this.error = error;
        this.ended = true;
        clearInterval(this.heartbeat);
        reject(error);
        for (const wake of this.waiters.splice(0)) wake();
      });
      stream.on("end", () => {
        this.ended = true;
        clearInterval(this.heartbeat);
        reject(new Error("stream ended"));
        for (const wake of this.waiters.splice(0)) wake();
      });
    });
    stream.write(
      ConnectRequest.fromPartial({
        message: {
          $case: "register",
          value: {
            executorId: this.id,
            instance: this.instance,
            version: "test",
            device: {
              name: "fake",
              kind: "cpu",
              totalBytes: 1 << 30,
              freeBytes: 1 << 30,
              h2dGbps: 10,
              threads: 1,
              tflops: 1,
              dispatchUs: 10,
              ...this.device,
            },
            holdings: this.holdings(),
          },
        },
      }),
    );
    this.heartbeat = setInterval(() => {
      const holdings = this.holdings();
      this.send({ $case: "heartbeat", value: { freeBytes: holdings.freeBytes, holdings } });
    }, heartbeatMs);
    return registered;
  }

  send(message: ConnectRequest["message"]): void {
    this.stream?.write(ConnectRequest.fromPartial({ message }));
  }

  /** Waits until `predicate` holds on what was received (or the stream ends). */
  async waitFor(predicate: () => boolean, timeoutMs = 10_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!predicate()) {
      if (Date.now() > deadline) throw new Error(`${this.id}: timed out waiting`);
      await new Promise<void>((wake) => {
        this.waiters.push(wake);
        setTimeout(wake, 50);
      });
    }
  }

  private consumed = 0;

  /** The next RunJob not yet returned by this method. */
  async nextRun(): Promise<RunJob> {
    await this.waitFor(() => this.runs.length > this.consumed);
    return this.runs[this.consumed++];
  }

  started(jobId: string): void {
    this.send({ $case: "jobUpdate", value: { update: { $case: "started", value: { jobId } } } });
  }

  progress(jobId: string, step: number, steps: number): void {
    this.send({
      $case: "jobUpdate",
      value: {
        update: {
          $case: "progress",
          value: {
            jobId,
            steps,
            stats: {
              step,
              stepSeconds: 0.001,
              prepareSeconds: 0,
              h2dSeconds: 0,
              computeSeconds: 0.001,
              h2dBytes: 0,
              diskBytes: 0,
              arenaPeakBytes: 0,
              segments: [],
              stallSeconds: 0,
              startUs: 0,
              endUs: 0,
              events: [],
            },
          },
        },
      },
    });
  }

  succeed(jobId: string, extra: Partial<JobResult> = {}): void {
    this.send({
      $case: "jobUpdate",
      value: {
        update: {
          $case: "result",
          value: JobResult.fromPartial({
            jobId,
            state: JobState.JOB_STATE_SUCCEEDED,
            checksum: "c0ffee",
            output: Buffer.from([1, 2, 3, 4]),
            outputShape: [1, 1, 1],
            executorId: this.id,
            ...extra,
          }),
        },
      },
    });
  }

  /** Drops the connection without a goodbye (heartbeats stop too). */
  drop(): void {
    clearInterval(this.heartbeat);
    this.stream?.cancel();
    this.stream = undefined;
  }

  close(): void {
    clearInterval(this.heartbeat);
    this.stream?.cancel();
    this.client.close();
  }
}
