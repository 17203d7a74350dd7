/**
 * Profiles as the planner takes them: parsing and validation of `ferry plan --profile p.json`
 * (for real models Ferry cannot load, measured elsewhere) and the same checks on in-memory
 * profiles before any policy sees them, so a NaN or a negative size fails with the field's name
 * instead of producing a nonsense plan.
 *
 * File shape (snake_case, the field names of lib/model/profile.ts):
 * ```json
 * { "model":  { "name": "…", "segments": [ { "name", "param_bytes", "compute_buffer_bytes",
 *                "output_bytes", "prev_cut_bytes", "external_bytes"?, "flops"? } ] },
 *   "device": { "name", "total_bytes", "free_bytes", "h2d_gbps"?, "tflops"?, "dispatch_us"? } }
 * ```
 * Fields marked `?` default to 0 (0 = unknown for the device rates). Unknown fields are ignored
 * with a warning, so a typo such as `external_byte` does not pass silently as 0.
 *
 * Documentation fields: the file, `model` and `device` may each carry `"source"` (where the
 * numbers come from: a config, a spec sheet, a measurement) and `"notes"` (how they were derived),
 * each a string or an array of strings. They are checked for type and otherwise ignored.
 * The model and the device may also live in separate files (`{"source", "notes", "model"}` and
 * `{"source", "notes", "device"}`), combined by `ferry plan --profile m.json --device-profile d.json`.
 */
import { readFile } from "node:fs/promises";
import type { BaseSegment, DeviceProfile, ModelProfile } from "../model/profile";
import { PlanError } from "./types";

/** A parsed profile file that may lack its device (see {@link ProfileFileOptions.deviceOptional}). */
export type PartialProfileFile = Omit<ProfileFile, "device"> & { device?: DeviceProfile };

/** Options of the profile parsers. */
export interface ProfileParseOptions {
  /**
   * Require `*_bytes` fields to be whole numbers. True for files (fractional bytes there are a
   * mistake); false for in-memory profiles, whose estimates may be computed in floating point.
   * @default true
   */
  wholeBytes?: boolean;
  /** Receives a line for every unknown field. @default ignored */
  warn?: (message: string) => void;
}

/** A parsed profile file. */
export interface ProfileFile {
  /** Absent only when the file has no `model` and the caller allowed that. */
  model?: ModelProfile;
  device: DeviceProfile;
  /** One line per unknown field that was ignored. */
  warnings: string[];
}

const SEGMENT_FIELDS = {
  required: ["param_bytes", "compute_buffer_bytes", "output_bytes", "prev_cut_bytes"],
  optional: ["external_bytes", "flops"],
} as const;
const DEVICE_FIELDS = {
  required: ["total_bytes", "free_bytes"],
  optional: ["h2d_gbps", "tflops", "dispatch_us"],
} as const;
/** Fields that document a profile (or its model or device) and are otherwise ignored. */
export const DOCUMENTATION_FIELDS = ["source", "notes"] as const;

interface Context {
  wholeBytes: boolean;
  warn: (message: string) => void;
}

function contextOf(options: ProfileParseOptions): Context {
  return { wholeBytes: options.wholeBytes ?? true, warn: options.warn ?? (() => {}) };
}

function describe(value: unknown): string {
  if (typeof value === "string") return JSON.stringify(value);
  if (value === null || typeof value !== "object") return String(value);
  return Array.isArray(value) ? "an array" : "an object";
}

function asObject(value: unknown, path: string): Record<string, unknown> {
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw new PlanError(`${path} must be an object (got ${describe(value)})`);
  }
  return value as Record<string, unknown>;
}

/** `source` and `notes` must be a string or an array of strings. */
function checkDocumentation(object: Record<string, unknown>, path: string): void {
  for (const field of DOCUMENTATION_FIELDS) {
    const value = object[field];
    if (value === undefined || typeof value === "string") continue;
    if (Array.isArray(value) && value.every((line) => typeof line === "string")) continue;
    throw new PlanError(
      `${path === "" ? "" : `${path}.`}${field} must be a string or an array of strings ` +
        `(got ${describe(value)})`,
    );
  }
}

function warnUnknown(
  object: Record<string, unknown>,
  known: readonly string[],
  path: string,
  context: Context,
): void {
  for (const key of Object.keys(object)) {
    // `$schema` and `_comment`-style keys are annotations, not typos.
    if (known.includes(key) || key.startsWith("$") || key.startsWith("_")) continue;
    context.warn(`${path}.${key} is not a known field; ignored`);
  }
}

function readName(object: Record<string, unknown>, path: string): string {
  const value = object.name;
  if (value === undefined) throw new PlanError(`${path}.name is missing`);
  if (typeof value !== "string" || value.length === 0) {
    throw new PlanError(`${path}.name must be a non-empty string (got ${describe(value)})`);
  }
  return value;
}

function readNumber(
  object: Record<string, unknown>,
  field: string,
  path: string,
  required: boolean,
  context: Context,
): number {
  const value = object[field];
  const fieldPath = `${path}.${field}`;
  if (value === undefined) {
    if (required) throw new PlanError(`${fieldPath} is missing`);
    return 0;
  }
  if (typeof value !== "number" || !Number.isFinite(value) || value < 0) {
    throw new PlanError(`${fieldPath} must be a non-negative number (got ${describe(value)})`);
  }
  if (field.endsWith("_bytes")) {
    if (context.wholeBytes && !Number.isInteger(value)) {
      throw new PlanError(`${fieldPath} must be a whole number of bytes (got ${value})`);
    }
    if (value > Number.MAX_SAFE_INTEGER) {
      throw new PlanError(`${fieldPath} is too large to count exactly (got ${value})`);
    }
  }
  return value;
}

function parseSegment(value: unknown, path: string, context: Context): BaseSegment {
  const object = asObject(value, path);
  warnUnknown(
    object,
    ["name", ...SEGMENT_FIELDS.required, ...SEGMENT_FIELDS.optional],
    path,
    context,
  );
  const name = readName(object, path);
  const number = (field: string, required: boolean) =>
    readNumber(object, field, path, required, context);
  return {
    name,
    param_bytes: number("param_bytes", true),
    compute_buffer_bytes: number("compute_buffer_bytes", true),
    output_bytes: number("output_bytes", true),
    prev_cut_bytes: number("prev_cut_bytes", true),
    external_bytes: number("external_bytes", false),
    flops: number("flops", false),
  };
}

/**
 * Validates a model profile and returns a normalised copy (missing optional fields = 0).
 * @param path how the model is named in messages. @default "model"
 * @throws PlanError naming the first bad field, e.g. `model.segments[3].param_bytes must be a
 *   non-negative number (got -5)`.
 */
export function parseModelProfile(
  value: unknown,
  options: ProfileParseOptions = {},
  path = "model",
): ModelProfile {
  const context = contextOf(options);
  const object = asObject(value, path);
  warnUnknown(object, ["name", "segments", ...DOCUMENTATION_FIELDS], path, context);
  checkDocumentation(object, path);
  const name = readName(object, path);
  const segments = object.segments;
  if (segments === undefined) throw new PlanError(`${path}.segments is missing`);
  if (!Array.isArray(segments)) {
    throw new PlanError(`${path}.segments must be an array (got ${describe(segments)})`);
  }
  return {
    name,
    segments: segments.map((segment, i) =>
      parseSegment(segment, `${path}.segments[${i}]`, context),
    ),
  };
}

/**
 * Validates a device profile and returns a normalised copy (missing rates = 0, meaning unknown).
 * @param path how the device is named in messages. @default "device"
 * @throws PlanError naming the first bad field, or when free memory exceeds total memory.
 */
export function parseDeviceProfile(
  value: unknown,
  options: ProfileParseOptions = {},
  path = "device",
): DeviceProfile {
  const context = contextOf(options);
  const object = asObject(value, path);
  warnUnknown(
    object,
    ["name", ...DEVICE_FIELDS.required, ...DEVICE_FIELDS.optional, ...DOCUMENTATION_FIELDS],
    path,
    context,
  );
  checkDocumentation(object, path);
  const number = (field: string, required: boolean) =>
    readNumber(object, field, path, required, context);
  const device: DeviceProfile = {
    name: readName(object, path),
    total_bytes: number("total_bytes", true),
    free_bytes: number("free_bytes", true),
    h2d_gbps: number("h2d_gbps", false),
    tflops: number("tflops", false),
    dispatch_us: number("dispatch_us", false),
  };
  if (device.free_bytes > device.total_bytes) {
    throw new PlanError(
      `${path}.free_bytes (${device.free_bytes}) is more than ${path}.total_bytes ` +
        `(${device.total_bytes})`,
    );
  }
  return device;
}

/** Options of {@link parseProfile}. */
export interface ProfileFileOptions {
  /**
   * Accept a file without `model` (the model comes from elsewhere, e.g. a model file given
   * alongside `--profile`).
   * @default false
   */
  modelOptional?: boolean;
  /**
   * Accept a file without `device` (the device comes from elsewhere, e.g. `--device-profile`).
   * @default false
   */
  deviceOptional?: boolean;
}

/** Validates the parsed JSON of a profile file. @throws PlanError naming the bad field. */
export function parseProfile(
  value: unknown,
  options?: ProfileFileOptions & { deviceOptional?: false },
): ProfileFile;
export function parseProfile(value: unknown, options: ProfileFileOptions): PartialProfileFile;
export function parseProfile(value: unknown, options: ProfileFileOptions = {}): PartialProfileFile {
  const warnings: string[] = [];
  const parseOptions: ProfileParseOptions = {
    wholeBytes: true,
    warn: (line) => warnings.push(line),
  };
  const root = asObject(value, "the profile");
  for (const key of Object.keys(root)) {
    const known =
      key === "model" || key === "device" || DOCUMENTATION_FIELDS.some((f) => f === key);
    if (!known && !key.startsWith("$") && !key.startsWith("_")) {
      warnings.push(`${key} is not a known field; ignored`);
    }
  }
  checkDocumentation(root, "");
  if (root.device === undefined && !options.deviceOptional)
    throw new PlanError("device is missing");
  if (root.model === undefined && !options.modelOptional) throw new PlanError("model is missing");
  const model =
    root.model === undefined ? undefined : parseModelProfile(root.model, parseOptions, "model");
  const device =
    root.device === undefined ? undefined : parseDeviceProfile(root.device, parseOptions, "device");
  return { model, device, warnings };
}

/**
 * Reads and validates a profile file. Every error message starts with the file's path.
 * @throws PlanError when the file cannot be read, is not JSON, or fails validation.
 */
export async function readProfileFile(
  path: string,
  options?: ProfileFileOptions & { deviceOptional?: false },
): Promise<ProfileFile>;
export async function readProfileFile(
  path: string,
  options: ProfileFileOptions,
): Promise<PartialProfileFile>;
export async function readProfileFile(
  path: string,
  options: ProfileFileOptions = {},
): Promise<PartialProfileFile> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (error) {
    const err = error as NodeJS.ErrnoException;
    const reason = err.code === "ENOENT" ? "no such file" : err.message;
    throw new PlanError(`cannot read profile ${path}: ${reason}`);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (error) {
    throw new PlanError(`${path} is not valid JSON: ${(error as Error).message}`);
  }
  try {
    const profile = parseProfile(json, options);
    return { ...profile, warnings: profile.warnings.map((line) => `${path}: ${line}`) };
  } catch (error) {
    if (error instanceof PlanError) throw new PlanError(`${path}: ${error.message}`);
    throw error;
  }
}
