/**
 * Byte sizes as people write them ("12GiB", "512 MiB", "1.5GB", "4096") and as Ferry prints them
 * ("12.0 GiB"). Binary units (KiB, MiB, GiB, TiB) are powers of 1024; decimal units (kB, MB, GB, TB)
 * are powers of 1000, as the SI and IEC define them. Single-letter suffixes (K, M, G, T) are
 * binary, as in `free -g`, Docker and the JVM's `-Xmx2g`, since memory sizes are counted that way.
 */

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;
export const TiB = 1024 * GiB;

/** Bytes per unit, keyed by the unit in lower case. */
const UNIT_BYTES: Record<string, number> = {
  "": 1,
  b: 1,
  k: KiB,
  kib: KiB,
  kb: 1e3,
  m: MiB,
  mib: MiB,
  mb: 1e6,
  g: GiB,
  gib: GiB,
  gb: 1e9,
  t: TiB,
  tib: TiB,
  tb: 1e12,
};

const SIZE_PATTERN = /^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e([+-]?[0-9]+))?\s*([a-z]*)$/i;

/** A size that cannot be understood; the message says what was expected. */
export class SizeFormatError extends Error {
  override name = "SizeFormatError";
}

/**
 * Parses a byte size: a non-negative number with an optional unit (case-insensitive, space
 * allowed): "2GiB", "512 MiB", "1.5GB", "64k", "4096". The result is rounded down to whole bytes.
 * @throws SizeFormatError for anything else (negative, not a number, unknown unit, too large).
 */
export function parseSize(text: string): number {
  const trimmed = text.trim();
  const match = SIZE_PATTERN.exec(trimmed);
  const unit = match ? UNIT_BYTES[match[3].toLowerCase()] : undefined;
  if (!match || unit === undefined) {
    throw new SizeFormatError(
      `'${text}' is not a size; write a number of bytes or a number with a unit, ` +
        `e.g. 12GiB, 512MiB, 1.5GB`,
    );
  }
  const value = Number(match[1] + (match[2] !== undefined ? `e${match[2]}` : ""));
  const bytes = Math.floor(value * unit);
  if (!Number.isSafeInteger(bytes)) {
    throw new SizeFormatError(`'${text}' is too large to be a size in bytes`);
  }
  return bytes;
}

/** {@link parseSize} under the name the flag parsers use (`--vram 2GiB`). */
export const parseBytes: (text: string) => number = parseSize;

/** Options of {@link formatBytes}. */
export interface FormatBytesOptions {
  /**
   * Print in this binary unit instead of the one that suits the value best — so the terms of a
   * sum read in one unit ("params 1.0 GiB + compute 0.2 GiB").
   * @default the largest unit in which the value is at least 1
   */
  unit?: "B" | "KiB" | "MiB" | "GiB" | "TiB";
  /** Digits after the decimal point (whole bytes are always printed without). @default 1 */
  digits?: number;
}

const BINARY_UNITS: Array<[NonNullable<FormatBytesOptions["unit"]>, number]> = [
  ["TiB", TiB],
  ["GiB", GiB],
  ["MiB", MiB],
  ["KiB", KiB],
  ["B", 1],
];

/** The binary unit {@link formatBytes} would choose for a value. */
export function bestUnit(bytes: number): NonNullable<FormatBytesOptions["unit"]> {
  const magnitude = Math.abs(bytes);
  for (const [name, size] of BINARY_UNITS) {
    if (magnitude >= size) return name;
  }
  return "B";
}

/**
 * A byte count for people: "12.0 GiB", "512.0 MiB", "300 B", "-8.0 GiB". Binary units, because
 * device memory is sized in them (a "12 GB" card has 12 GiB).
 */
export function formatBytes(bytes: number, options: FormatBytesOptions = {}): string {
  if (!Number.isFinite(bytes)) return `${bytes} B`;
  const unit = options.unit ?? bestUnit(bytes);
  if (unit === "B") return `${Math.round(bytes)} B`;
  const size = BINARY_UNITS.find(([name]) => name === unit)![1];
  return `${(bytes / size).toFixed(options.digits ?? 1)} ${unit}`;
}

/** A GiB count as the user wrote it for `--max-vram` ("-1", "10.5"), without float noise. */
export function formatGiBValue(gib: number): string {
  return String(Number(gib.toPrecision(12)));
}
