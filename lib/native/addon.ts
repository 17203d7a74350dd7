/**
 * The one place that loads Ferry's native addon, and the typed errors its failures map to.
 */
import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";
import { packageRoot } from "../packageInfo";
import type { NativeAddon } from "./AddonTypes";

export type * from "./AddonTypes";

/** A device allocation did not fit (the VRAM budget, the CPU arena's capacity). */
export class DeviceOutOfMemoryError extends Error {
  override name = "DeviceOutOfMemoryError";
}

/** A model file is corrupt, truncated, or not the layout it claims to be. */
export class ModelFormatError extends Error {
  override name = "ModelFormatError";
}

/** An argument, request or plan the native layer cannot use. */
export class InvalidArgumentError extends Error {
  override name = "InvalidArgumentError";
}

/** A run stopped because it was cancelled. */
export class CancelledError extends Error {
  override name = "CancelledError";
}

/** The device already runs a job; devices run one at a time. */
export class DeviceBusyError extends Error {
  override name = "DeviceBusyError";
}

/** A file operation failed; `code` is the errno name, as in Node's fs errors ("ENOENT"). */
export class IoError extends Error {
  override name = "IoError";
  code?: string;
  errno?: number;
  syscall?: string;
  path?: string;
}

/** The device is not on this machine or in this build (no GPU, no CUDA support compiled in). */
export class DeviceUnavailableError extends Error {
  override name = "DeviceUnavailableError";
}

/** A transfer's bytes on the device do not match their host source (`verify`). */
export class IntegrityError extends Error {
  override name = "IntegrityError";
}

const errorClasses: Record<string, new (message: string, options?: ErrorOptions) => Error> = {
  DeviceOutOfMemoryError,
  ModelFormatError,
  InvalidArgumentError,
  CancelledError,
  DeviceBusyError,
  IoError,
  DeviceUnavailableError,
  IntegrityError,
};

/**
 * Turns an error thrown or rejected by the addon into its typed class (by the native `name`),
 * keeping the message, the native stack and, for IoError, `code`/`errno`/`syscall`/`path`.
 * Anything else is returned unchanged.
 */
export function mapNativeError(error: Error): Error;
export function mapNativeError(error: unknown): unknown;
export function mapNativeError(error: unknown): unknown {
  if (!(error instanceof Error)) return error;
  // A separate binding: `instanceof` below would otherwise narrow `error` away.
  const source: Error & Partial<Pick<IoError, "code" | "errno" | "syscall" | "path">> = error;
  const ErrorClass = errorClasses[source.name];
  if (!ErrorClass || error instanceof ErrorClass) return error;
  const mapped = new ErrorClass(source.message, { cause: source });
  if (source.stack) mapped.stack = source.stack;
  if (mapped instanceof IoError) {
    mapped.code = source.code;
    mapped.errno = source.errno;
    mapped.syscall = source.syscall;
    mapped.path = source.path;
  }
  return mapped;
}

/** Where the build puts the addon (cmake-js, `npm run build:native`). */
export function addonPath(): string {
  return join(packageRoot(), "build", "Release", "ferry_native.node");
}

let cached: NativeAddon | undefined;

/**
 * Loads the native addon (once per process). Throws an Error saying how to build it when the
 * binary is missing.
 */
export function loadAddon(): NativeAddon {
  if (cached) return cached;
  const path = addonPath();
  if (!existsSync(path)) {
    throw new Error(
      `Ferry's native addon is not built: ${path} is missing. Run \`npm run build:native\` (needs CMake and a C++17 compiler).`,
    );
  }
  // ggml's compute threads are OpenMP's: waiting passively between graph nodes keeps them from
  // spinning away the cores that other executors, the copy thread and the loader share. Read by
  // the OpenMP runtime when the addon loads, so it is set before (a user's choice wins).
  process.env.OMP_WAIT_POLICY ??= "PASSIVE";
  // createRequire works the same from the TypeScript sources (vitest) and from dist/.
  cached = createRequire(join(packageRoot(), "package.json"))(path) as NativeAddon;
  return cached;
}
