/**
 * The scheduler's durable state: every job it has accepted, in an embedded SQLite database
 * (better-sqlite3), written at each state change (accepted, started, re-queued, finished) and
 * read back at start-up. Progress is not written: a restarted scheduler learns a running job's
 * progress from its executor. A finished job's result (output included) is kept until the
 * retention time passes, so a late WatchJob gets it even after a restart.
 *
 * One scheduler at a time: the database is opened in exclusive locking mode, so a second
 * scheduler on the same file fails at start-up instead of both writing it.
 */
import { mkdirSync } from "node:fs";
import { dirname } from "node:path";
import Database from "better-sqlite3";
import {
  JobResult,
  JobSpec,
  Plan as PlanMessage,
  type JobState,
} from "../../gen/ferry/v1/scheduler";

/** The persisted part of a job. */
export interface JobRow {
  id: string;
  seq: number;
  priority: number;
  idempotencyKey: string;
  requestHash: string;
  spec: JobSpec;
  /** The model reference as the client gave it. */
  modelRef: string;
  state: JobState;
  executorId: string;
  plan: PlanMessage | undefined;
  submittedMs: number;
  startedMs: number;
  finishedMs: number;
  attempts: number;
  lastStep: number;
  errorCode: string;
  errorMessage: string;
  checksum: string;
  outputShape: number[];
  totalSeconds: number;
}

const SCHEMA_VERSION = 1;

interface RawRow {
  id: string;
  seq: number;
  priority: number;
  idempotency_key: string | null;
  request_hash: string;
  spec: Buffer;
  model_ref: string;
  state: number;
  executor_id: string;
  plan: Buffer | null;
  submitted_ms: number;
  started_ms: number;
  finished_ms: number;
  attempts: number;
  last_step: number;
  error_code: string;
  error_message: string;
  checksum: string;
  output_shape: string;
  total_seconds: number;
}

export class JobStore {
  private readonly db: Database.Database;
  private readonly statements;

  /**
   * Opens (creating if needed) the database at `path`; ":memory:" keeps it in memory (nothing
   * survives the process). Throws naming the file when it cannot be opened or is in use.
   */
  constructor(readonly path: string) {
    if (path !== ":memory:") mkdirSync(dirname(path), { recursive: true });
    try {
      this.db = new Database(path, { timeout: 1000 });
      this.db.pragma("locking_mode = EXCLUSIVE");
      this.db.pragma("journal_mode = WAL");
      this.db.pragma("synchronous = NORMAL");
      // Takes the exclusive lock now, so a second scheduler fails here.
      this.db.exec("BEGIN EXCLUSIVE; COMMIT;");
    } catch (error) {
      const message = (error as Error).message;
      throw new Error(
        /locked|busy/i.test(message)
          ? `the job database ${path} is in use by another scheduler`
          : `cannot open the job database ${path}: ${message}`,
        { cause: error },
      );
    }
    const version = this.db.pragma("user_version", { simple: true }) as number;
    if (version > SCHEMA_VERSION) {
      throw new Error(
        `the job database ${path} was written by a newer Ferry (schema ${version}; this one reads ${SCHEMA_VERSION})`,
      );
    }
    this.db.exec(`
      CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL UNIQUE,
        priority INTEGER NOT NULL,
        idempotency_key TEXT UNIQUE,
        request_hash TEXT NOT NULL,
        spec BLOB NOT NULL,
        model_ref TEXT NOT NULL,
        state INTEGER NOT NULL,
        executor_id TEXT NOT NULL,
        plan BLOB,
        submitted_ms INTEGER NOT NULL,
        started_ms INTEGER NOT NULL,
        finished_ms INTEGER NOT NULL,
        attempts INTEGER NOT NULL,
        last_step INTEGER NOT NULL,
        error_code TEXT NOT NULL,
        error_message TEXT NOT NULL,
        checksum TEXT NOT NULL,
        output_shape TEXT NOT NULL,
        total_seconds REAL NOT NULL,
        result BLOB
      );
      CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_ms);
    `);
    this.db.pragma(`user_version = ${SCHEMA_VERSION}`);
    this.statements = {
      upsert: this.db.prepare(`
        INSERT INTO jobs (id, seq, priority, idempotency_key, request_hash, spec, model_ref, state,
          executor_id, plan, submitted_ms, started_ms, finished_ms, attempts, last_step,
          error_code, error_message, checksum, output_shape, total_seconds)
        VALUES (@id, @seq, @priority, @idempotency_key, @request_hash, @spec, @model_ref, @state,
          @executor_id, @plan, @submitted_ms, @started_ms, @finished_ms, @attempts, @last_step,
          @error_code, @error_message, @checksum, @output_shape, @total_seconds)
        ON CONFLICT (id) DO UPDATE SET state = @state, executor_id = @executor_id, plan = @plan,
          started_ms = @started_ms, finished_ms = @finished_ms, attempts = @attempts,
          last_step = @last_step, error_code = @error_code, error_message = @error_message,
          checksum = @checksum, output_shape = @output_shape, total_seconds = @total_seconds`),
      result: this.db.prepare("UPDATE jobs SET result = ? WHERE id = ?"),
      getResult: this.db.prepare("SELECT result FROM jobs WHERE id = ?"),
      all: this.db.prepare("SELECT * FROM jobs ORDER BY seq"),
      maxSeq: this.db.prepare("SELECT COALESCE(MAX(seq), 0) AS seq FROM jobs"),
      expire: this.db.prepare(
        "DELETE FROM jobs WHERE finished_ms > 0 AND finished_ms < ? RETURNING id",
      ),
    };
  }

  /** Writes a job's row (insert or update of its changing fields). */
  save(job: JobRow): void {
    this.statements.upsert.run({
      id: job.id,
      seq: job.seq,
      priority: job.priority,
      idempotency_key: job.idempotencyKey || null,
      request_hash: job.requestHash,
      spec: Buffer.from(JobSpec.encode(job.spec).finish()),
      model_ref: job.modelRef,
      state: job.state,
      executor_id: job.executorId,
      plan: job.plan ? Buffer.from(PlanMessage.encode(job.plan).finish()) : null,
      submitted_ms: job.submittedMs,
      started_ms: job.startedMs,
      finished_ms: job.finishedMs,
      attempts: job.attempts,
      last_step: job.lastStep,
      error_code: job.errorCode,
      error_message: job.errorMessage,
      checksum: job.checksum,
      output_shape: JSON.stringify(job.outputShape),
      total_seconds: job.totalSeconds,
    });
  }

  /** Writes a finished job's row and its result (output included) in one transaction. */
  finish(job: JobRow, result: JobResult): void {
    this.db.transaction(() => {
      this.save(job);
      this.statements.result.run(Buffer.from(JobResult.encode(result).finish()), job.id);
    })();
  }

  /** A finished job's full result, or undefined when it has none stored. */
  result(id: string): JobResult | undefined {
    const row = this.statements.getResult.get(id) as { result: Buffer | null } | undefined;
    return row?.result ? JobResult.decode(row.result) : undefined;
  }

  /** Every job, oldest first. */
  loadAll(): JobRow[] {
    return (this.statements.all.all() as RawRow[]).map((row) => ({
      id: row.id,
      seq: row.seq,
      priority: row.priority,
      idempotencyKey: row.idempotency_key ?? "",
      requestHash: row.request_hash,
      spec: JobSpec.decode(row.spec),
      modelRef: row.model_ref,
      state: row.state as JobState,
      executorId: row.executor_id,
      plan: row.plan ? PlanMessage.decode(row.plan) : undefined,
      submittedMs: row.submitted_ms,
      startedMs: row.started_ms,
      finishedMs: row.finished_ms,
      attempts: row.attempts,
      lastStep: row.last_step,
      errorCode: row.error_code,
      errorMessage: row.error_message,
      checksum: row.checksum,
      outputShape: JSON.parse(row.output_shape) as number[],
      totalSeconds: row.total_seconds,
    }));
  }

  /** The highest sequence number used, so new jobs continue after it. */
  maxSeq(): number {
    return (this.statements.maxSeq.get() as { seq: number }).seq;
  }

  /** Deletes jobs that finished before `beforeMs`; returns their ids. */
  expire(beforeMs: number): string[] {
    return (this.statements.expire.all(beforeMs) as { id: string }[]).map((row) => row.id);
  }

  close(): void {
    if (this.db.open) this.db.close();
  }
}
