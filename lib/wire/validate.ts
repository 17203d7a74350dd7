/**
 * Range and length checks for everything a caller sends: each failure is an INVALID_ARGUMENT
 * naming the field and the allowed range, quoting at most a short prefix of what was sent.
 */
import { status } from "@grpc/grpc-js";
import { MAX_QUOTED_LENGTH } from "./limits";
import { StatusError } from "./statusError";

/** A caller's string as an error may show it: JSON-quoted, cut to a short prefix. */
export function quote(value: string, max = MAX_QUOTED_LENGTH): string {
  const cut = value.length > max ? `${value.slice(0, max)}…` : value;
  return `${JSON.stringify(cut)}${value.length > max ? ` (${value.length} characters)` : ""}`;
}

function invalid(message: string): never {
  throw new StatusError(status.INVALID_ARGUMENT, message);
}

/** An integer field in [min, max]. */
export function checkInteger(field: string, value: number, min: number, max: number): number {
  if (!Number.isInteger(value) || value < min || value > max) {
    invalid(`${field} must be a whole number between ${min} and ${max} (got ${value})`);
  }
  return value;
}

/** A finite number in [min, max]. */
export function checkNumber(field: string, value: number, min: number, max: number): number {
  if (!Number.isFinite(value) || value < min || value > max) {
    invalid(`${field} must be a number between ${min} and ${max} (got ${value})`);
  }
  return value;
}

/** A string of at most `max` characters, optionally matching `pattern` (described by `what`). */
export function checkString(
  field: string,
  value: string,
  max: number,
  pattern?: { regex: RegExp; what: string },
): string {
  if (value.length > max) {
    invalid(`${field} is too long (${value.length} characters; at most ${max})`);
  }
  if (value.includes("\0")) invalid(`${field} must not contain NUL characters`);
  if (pattern && value !== "" && !pattern.regex.test(value)) {
    invalid(`${field} ${quote(value)} must be ${pattern.what}`);
  }
  return value;
}

/** Executor ids and idempotency keys: printable, no spaces, no path separators. */
export const ID_PATTERN = {
  regex: /^[A-Za-z0-9._:-]+$/,
  what: "letters, digits, '.', '_', ':' or '-'",
};

/** One of a fixed set of names ("" allowed when `optional`). */
export function checkChoice<T extends string>(
  field: string,
  value: string,
  known: readonly T[],
  optional = true,
): T | "" {
  if (value === "" && optional) return "";
  if (!known.includes(value as T)) {
    invalid(`unknown ${field} ${quote(value, 32)} (known: ${known.join(", ")})`);
  }
  return value as T;
}
