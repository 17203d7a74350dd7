import { Metadata, status, type ServiceError } from "@grpc/grpc-js";
import { PlanError } from "../planner/types";

/** A gRPC status error: what handlers throw so the client sees a code and a message. */
export class StatusError extends Error implements Partial<ServiceError> {
  override name = "StatusError";
  readonly details: string;
  readonly metadata = new Metadata();

  constructor(
    readonly code: status,
    message: string,
  ) {
    super(message);
    this.details = message;
  }
}

/** Status code names as they travel in JobError.code. */
export function statusName(code: status): string {
  return status[code] ?? "UNKNOWN";
}

export function statusFromName(name: string): status {
  const code = (status as unknown as Record<string, number>)[name];
  return typeof code === "number" ? code : status.UNKNOWN;
}

/**
 * The one place that maps any error to a gRPC status. Known failures keep their meaning; anything
 * else is INTERNAL, with the cause logged here so it is not lost.
 */
export function toStatusError(
  error: unknown,
  log: (line: string) => void = console.error,
): StatusError {
  if (error instanceof StatusError) return error;
  const err = error as NodeJS.ErrnoException;
  if (error instanceof PlanError) return new StatusError(status.RESOURCE_EXHAUSTED, err.message);
  switch (err?.name) {
    case "ModelFormatError":
    case "InvalidArgumentError":
      return new StatusError(status.INVALID_ARGUMENT, err.message);
    case "DeviceOutOfMemoryError":
      return new StatusError(status.RESOURCE_EXHAUSTED, err.message);
    case "CancelledError":
      return new StatusError(status.CANCELLED, err.message);
    case "DeviceBusyError":
    case "DeviceUnavailableError":
      return new StatusError(status.UNAVAILABLE, err.message);
    case "IntegrityError":
      // Weights changed between the host and the device (verify): the data is corrupt.
      return new StatusError(status.DATA_LOSS, err.message);
    case "IoError":
      return new StatusError(status.FAILED_PRECONDITION, err.message);
  }
  if (err?.code === "ENOENT") {
    return new StatusError(status.NOT_FOUND, `file not found: ${err.path ?? err.message}`);
  }
  if (err?.code === "EACCES") {
    return new StatusError(
      status.PERMISSION_DENIED,
      `permission denied: ${err.path ?? err.message}`,
    );
  }
  log(`ferry: internal error: ${err?.stack ?? String(error)}`);
  return new StatusError(status.INTERNAL, `internal error: ${err?.message ?? String(error)}`);
}
