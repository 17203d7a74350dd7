/**
 * safetensors: header reader (header only — a multi-GB model is never read to plan it), a
 * streaming writer, and a small tensor decoder for tests and inspection.
 *
 * Format (https://github.com/huggingface/safetensors): an 8-byte little-endian u64 N, N bytes of
 * UTF-8 JSON `{"__metadata__": {str: str}, "<name>": {"dtype", "shape", "data_offsets": [b, e]}}`,
 * then the data; offsets are relative to the start of the data.
 */
import { promises as fs } from "node:fs";
import { openRegularFile } from "./openRegularFile";
import { bf16ToF32, f16ToF32 } from "./half";

/** A model file that cannot be used: truncated, corrupt, or not the model it claims to be. */
export class ModelFormatError extends Error {
  override name = "ModelFormatError";
}

/** Bytes per element of every safetensors dtype. */
export const SAFETENSORS_DTYPE_BYTES = {
  BOOL: 1,
  U8: 1,
  I8: 1,
  F8_E5M2: 1,
  F8_E4M3: 1,
  I16: 2,
  U16: 2,
  F16: 2,
  BF16: 2,
  I32: 4,
  U32: 4,
  F32: 4,
  F64: 8,
  I64: 8,
  U64: 8,
} as const;

export type SafetensorsDtype = keyof typeof SAFETENSORS_DTYPE_BYTES;

export function isSafetensorsDtype(value: string): value is SafetensorsDtype {
  return Object.prototype.hasOwnProperty.call(SAFETENSORS_DTYPE_BYTES, value);
}

/** One tensor of a safetensors file, with absolute file offsets. */
export interface SafetensorsTensor {
  name: string;
  dtype: SafetensorsDtype;
  shape: number[];
  /** Absolute file offset of the first byte. */
  begin: number;
  /** Absolute file offset one past the last byte. */
  end: number;
  /** end − begin. */
  bytes: number;
}

export interface SafetensorsHeader {
  path: string;
  /** N: length of the JSON header. */
  headerBytes: number;
  /** Absolute offset of the data section: 8 + N. */
  dataStart: number;
  /** Total file size. */
  fileBytes: number;
  /** `__metadata__`, or {} when absent. */
  metadata: Record<string, string>;
  /** Tensors sorted by `begin` (data order). */
  tensors: SafetensorsTensor[];
}

/**
 * Headers above this are refused before allocating anything: the reference implementation uses
 * the same 100 MB limit, and a larger length field is the usual sign of a file that is not
 * safetensors at all.
 */
export const MAX_HEADER_BYTES = 100_000_000;

/** Reads exactly `length` bytes at `position`, or fewer only at end of file. */
async function readAt(fh: fs.FileHandle, position: number, length: number): Promise<Uint8Array> {
  const buffer = new Uint8Array(length);
  let filled = 0;
  while (filled < length) {
    const { bytesRead } = await fh.read(buffer, filled, length - filled, position + filled);
    if (bytesRead === 0) break;
    filled += bytesRead;
  }
  return filled === length ? buffer : buffer.subarray(0, filled);
}

function describe(value: unknown): string {
  const text = JSON.stringify(value);
  if (text === undefined) return String(value);
  return text.length > 60 ? `${text.slice(0, 57)}...` : text;
}

/**
 * Reads and validates a safetensors header without reading the data. Every problem —
 * truncation, a length field past the end, bad JSON, ill-typed or unknown fields, offsets out of
 * range or overlapping, a byte size that does not match the shape — is a `ModelFormatError`
 * naming the file and the tensor.
 */
export async function readSafetensorsHeader(path: string): Promise<SafetensorsHeader> {
  const { fh, info } = await openRegularFile(path);
  try {
    const fileBytes = info.size;
    const fail = (problem: string): never => {
      throw new ModelFormatError(`${path}: ${problem}`);
    };
    if (fileBytes < 8) {
      fail(
        `file is too short to be safetensors (${fileBytes} bytes; the 8-byte header length alone needs 8)`,
      );
    }
    const lengthField = await readAt(fh, 0, 8);
    const n = new DataView(lengthField.buffer, lengthField.byteOffset, 8).getBigUint64(0, true);
    if (n > BigInt(MAX_HEADER_BYTES)) {
      fail(
        `header length ${n} exceeds the ${MAX_HEADER_BYTES}-byte limit (file is ${fileBytes} bytes); not a safetensors file or corrupt`,
      );
    }
    const headerBytes = Number(n);
    if (8 + headerBytes > fileBytes) {
      fail(
        `header length ${headerBytes} runs past the end of the file (${fileBytes} bytes, so at most ${fileBytes - 8}); truncated or not safetensors`,
      );
    }
    const raw = await readAt(fh, 8, headerBytes);
    if (raw.length !== headerBytes) fail(`file shrank while reading the header`);
    let text: string;
    try {
      text = new TextDecoder("utf-8", { fatal: true }).decode(raw);
    } catch {
      return fail(`header is not valid UTF-8`);
    }
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch (err) {
      // V8's message quotes the text around the error: say where, never what (file contents).
      const position = /position (\d+)/.exec((err as Error).message)?.[1];
      return fail(`header is not valid JSON${position ? ` (at byte ${position})` : ""}`);
    }
    return parseHeaderObject(json, { path, headerBytes, fileBytes });
  } finally {
    await fh.close();
  }
}

function parseHeaderObject(
  json: unknown,
  where: { path: string; headerBytes: number; fileBytes: number },
): SafetensorsHeader {
  const { path, headerBytes, fileBytes } = where;
  const fail = (problem: string): never => {
    throw new ModelFormatError(`${path}: ${problem}`);
  };
  if (json === null || typeof json !== "object" || Array.isArray(json)) {
    fail(`header must be a JSON object, got ${describe(json)}`);
  }
  const dataStart = 8 + headerBytes;
  const dataBytes = fileBytes - dataStart;
  const metadata: Record<string, string> = {};
  const tensors: SafetensorsTensor[] = [];
  for (const [name, entry] of Object.entries(json as Record<string, unknown>)) {
    if (name === "__metadata__") {
      if (entry === null || typeof entry !== "object" || Array.isArray(entry)) {
        fail(`__metadata__ must be an object of strings, got ${describe(entry)}`);
      }
      for (const [key, value] of Object.entries(entry as Record<string, unknown>)) {
        if (typeof value !== "string") {
          fail(`__metadata__ value of "${key}" must be a string, got ${describe(value)}`);
        }
        metadata[key] = value as string;
      }
      continue;
    }
    const bad = (problem: string): never => fail(`tensor "${name}": ${problem}`);
    if (entry === null || typeof entry !== "object" || Array.isArray(entry)) {
      bad(`entry must be an object with dtype, shape and data_offsets, got ${describe(entry)}`);
    }
    const { dtype, shape, data_offsets: offsets } = entry as Record<string, unknown>;
    if (typeof dtype !== "string") bad(`missing or non-string "dtype" (${describe(dtype)})`);
    if (!isSafetensorsDtype(dtype as string)) {
      bad(
        `unknown dtype ${describe(dtype)} (known: ${Object.keys(SAFETENSORS_DTYPE_BYTES).join(", ")})`,
      );
    }
    if (
      !Array.isArray(shape) ||
      !shape.every((d) => typeof d === "number" && Number.isSafeInteger(d) && d >= 0)
    ) {
      bad(`"shape" must be an array of non-negative integers, got ${describe(shape)}`);
    }
    if (
      !Array.isArray(offsets) ||
      offsets.length !== 2 ||
      !offsets.every((o) => typeof o === "number" && Number.isSafeInteger(o) && o >= 0)
    ) {
      bad(`"data_offsets" must be [begin, end] of non-negative integers, got ${describe(offsets)}`);
    }
    const [b, e] = offsets as [number, number];
    if (b > e) bad(`data_offsets [${b}, ${e}] begin after end`);
    if (e > dataBytes) {
      bad(
        `data_offsets [${b}, ${e}] run past the end of the data (${dataBytes} bytes after the header); file truncated?`,
      );
    }
    const type = dtype as SafetensorsDtype;
    const dims = shape as number[];
    // BigInt: a corrupt shape can overflow 2^53 long before it overflows the check.
    const expected =
      dims.reduce((acc, d) => acc * BigInt(d), 1n) * BigInt(SAFETENSORS_DTYPE_BYTES[type]);
    if (expected !== BigInt(e - b)) {
      bad(
        `data_offsets [${b}, ${e}] hold ${e - b} bytes, but ${type} shape [${dims.join(", ")}] needs ${expected}`,
      );
    }
    tensors.push({
      name,
      dtype: type,
      shape: dims.slice(),
      begin: dataStart + b,
      end: dataStart + e,
      bytes: e - b,
    });
  }
  // Stable sort keeps JSON order among empty tensors that share an offset.
  tensors.sort((x, y) => x.begin - y.begin || x.end - y.end);
  for (let i = 1; i < tensors.length; i++) {
    const prev = tensors[i - 1]!;
    const cur = tensors[i]!;
    if (cur.begin < prev.end) {
      fail(
        `tensor "${cur.name}" data_offsets [${cur.begin - dataStart}, ${cur.end - dataStart}] overlap tensor "${prev.name}" [${prev.begin - dataStart}, ${prev.end - dataStart}]`,
      );
    }
  }
  return { path, headerBytes, dataStart, fileBytes, metadata, tensors };
}

/** The tensor named `name`, or a ModelFormatError naming what is missing. */
export function findTensor(header: SafetensorsHeader, name: string): SafetensorsTensor {
  const tensor = header.tensors.find((t) => t.name === name);
  if (!tensor) throw new ModelFormatError(`${header.path}: no tensor named "${name}"`);
  return tensor;
}

/** Reads one tensor's raw bytes (little-endian, as stored). */
export async function readTensorBytes(
  path: string,
  tensor: SafetensorsTensor,
): Promise<Uint8Array> {
  const fh = await fs.open(path, "r");
  try {
    const bytes = await readAt(fh, tensor.begin, tensor.bytes);
    if (bytes.length !== tensor.bytes) {
      throw new ModelFormatError(
        `${path}: tensor "${tensor.name}" is truncated (${bytes.length} of ${tensor.bytes} bytes readable)`,
      );
    }
    return bytes;
  } finally {
    await fh.close();
  }
}

/** float8 e4m3fn (bias 7, no infinities, S.1111.111 is NaN) → value. */
function f8e4m3ToNumber(b: number): number {
  const sign = (b & 0x80) !== 0 ? -1 : 1;
  const exponent = (b >>> 3) & 0xf;
  const mantissa = b & 0x7;
  if (exponent === 0xf && mantissa === 0x7) return NaN;
  if (exponent === 0) return sign * mantissa * 2 ** -9;
  return sign * (8 + mantissa) * 2 ** (exponent - 10);
}

/**
 * Decodes little-endian tensor bytes to numbers. 64-bit integers beyond 2^53 lose precision (this
 * is an inspection helper; Ferry computes only with float weights).
 */
export function decodeTensor(dtype: SafetensorsDtype, bytes: Uint8Array): number[] {
  const size = SAFETENSORS_DTYPE_BYTES[dtype];
  if (bytes.length % size !== 0) {
    throw new RangeError(`decodeTensor: ${bytes.length} bytes is not a whole number of ${dtype}`);
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const n = bytes.length / size;
  const out = new Array<number>(n);
  for (let i = 0; i < n; i++) {
    const at = i * size;
    switch (dtype) {
      case "BOOL":
        out[i] = view.getUint8(at) !== 0 ? 1 : 0;
        break;
      case "U8":
        out[i] = view.getUint8(at);
        break;
      case "I8":
        out[i] = view.getInt8(at);
        break;
      case "F8_E5M2":
        // e5m2 is the top byte of a binary16.
        out[i] = f16ToF32(view.getUint8(at) << 8);
        break;
      case "F8_E4M3":
        out[i] = f8e4m3ToNumber(view.getUint8(at));
        break;
      case "I16":
        out[i] = view.getInt16(at, true);
        break;
      case "U16":
        out[i] = view.getUint16(at, true);
        break;
      case "F16":
        out[i] = f16ToF32(view.getUint16(at, true));
        break;
      case "BF16":
        out[i] = bf16ToF32(view.getUint16(at, true));
        break;
      case "I32":
        out[i] = view.getInt32(at, true);
        break;
      case "U32":
        out[i] = view.getUint32(at, true);
        break;
      case "F32":
        out[i] = view.getFloat32(at, true);
        break;
      case "F64":
        out[i] = view.getFloat64(at, true);
        break;
      case "I64":
        out[i] = Number(view.getBigInt64(at, true));
        break;
      case "U64":
        out[i] = Number(view.getBigUint64(at, true));
        break;
    }
  }
  return out;
}

/** Reads and decodes tensor `name` of a file whose header was read with readSafetensorsHeader. */
export async function readTensor(
  path: string,
  header: SafetensorsHeader,
  name: string,
): Promise<number[]> {
  const tensor = findTensor(header, name);
  return decodeTensor(tensor.dtype, await readTensorBytes(path, tensor));
}

/** Chunks of a tensor's bytes; each chunk may be reused by the producer once the next is asked for. */
export type TensorChunks = Iterable<Uint8Array> | AsyncIterable<Uint8Array>;

/** One tensor to write. The data is pulled only when the writer reaches the tensor. */
export interface TensorToWrite {
  name: string;
  dtype: SafetensorsDtype;
  shape: number[];
  /**
   * The bytes (little-endian, exactly product(shape)·element size of them), or a function called
   * once, when the tensor's turn comes, returning the bytes or chunks of them — so a large model
   * is generated and written piece by piece.
   */
  data: Uint8Array | (() => Uint8Array | TensorChunks | Promise<Uint8Array>);
}

/**
 * Streams one tensor's data (bytes, or the chunks its producer yields when its turn comes) to
 * `out`, checking it is exactly `expected` bytes; `layout` names the dtype and shape in the
 * error. Shared by the safetensors and GGUF writers.
 */
export async function writeTensorData(
  out: BufferedFileWriter,
  tensor: { name: string; data: TensorToWrite["data"] },
  expected: number,
  layout: string,
  onWritten: (bytes: number) => void,
): Promise<void> {
  let got = 0;
  const source = typeof tensor.data === "function" ? await tensor.data() : tensor.data;
  const chunks: TensorChunks = isChunkIterable(source) ? source : [source];
  for await (const chunk of chunks) {
    got += chunk.length;
    if (got > expected) break;
    await out.write(chunk);
    onWritten(chunk.length);
  }
  if (got !== expected) {
    throw new RangeError(
      `tensor "${tensor.name}": data has ${got > expected ? `more than ${expected}` : got} bytes, but ${layout} needs ${expected}`,
    );
  }
}

export interface WriteSafetensorsOptions {
  /** Called after each chunk with the bytes of data written so far and the total. */
  onProgress?: (written: number, total: number) => void;
}

export interface WriteSafetensorsResult {
  path: string;
  /** File size. */
  bytes: number;
  headerBytes: number;
  dataStart: number;
}

/**
 * The header JSON for `tensors` laid out back to back in the given order, padded with spaces so
 * the data starts 8-byte aligned (as the reference writer does).
 */
export function encodeSafetensorsHeader(
  metadata: Record<string, string>,
  tensors: ReadonlyArray<Pick<TensorToWrite, "name" | "dtype" | "shape">>,
): { header: Uint8Array; dataBytes: number; offsets: [number, number][] } {
  const json: Record<string, unknown> = {};
  if (Object.keys(metadata).length > 0) {
    for (const [key, value] of Object.entries(metadata)) {
      if (typeof value !== "string") {
        throw new TypeError(`safetensors metadata "${key}" must be a string`);
      }
    }
    json["__metadata__"] = metadata;
  }
  const offsets: [number, number][] = [];
  const seen = new Set<string>();
  let at = 0;
  for (const t of tensors) {
    if (t.name === "__metadata__" || t.name.length === 0) {
      throw new TypeError(`invalid tensor name ${JSON.stringify(t.name)}`);
    }
    if (seen.has(t.name)) throw new TypeError(`duplicate tensor name "${t.name}"`);
    seen.add(t.name);
    if (!isSafetensorsDtype(t.dtype))
      throw new TypeError(`tensor "${t.name}": unknown dtype ${t.dtype}`);
    if (!t.shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      throw new TypeError(`tensor "${t.name}": bad shape [${t.shape.join(", ")}]`);
    }
    const bytes = t.shape.reduce((acc, d) => acc * d, 1) * SAFETENSORS_DTYPE_BYTES[t.dtype];
    if (!Number.isSafeInteger(at + bytes)) throw new RangeError(`tensor "${t.name}" is too large`);
    offsets.push([at, at + bytes]);
    json[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [at, at + bytes] };
    at += bytes;
  }
  let text = JSON.stringify(json);
  const encoded = new TextEncoder().encode(text);
  const padded = Math.ceil(encoded.length / 8) * 8;
  text += " ".repeat(padded - encoded.length);
  const header = new Uint8Array(8 + padded);
  new DataView(header.buffer).setBigUint64(0, BigInt(padded), true);
  header.set(new TextEncoder().encode(text), 8);
  return { header, dataBytes: at, offsets };
}

/** Coalesces small writes (biases, norms) so a model is not thousands of tiny syscalls. */
export class BufferedFileWriter {
  private readonly buffer: Uint8Array;
  private used = 0;
  written = 0;

  constructor(
    private readonly fh: fs.FileHandle,
    capacity = 4 << 20,
  ) {
    this.buffer = new Uint8Array(capacity);
  }

  async write(chunk: Uint8Array): Promise<void> {
    if (chunk.length >= this.buffer.length) {
      await this.flush();
      await this.writeFully(chunk);
      return;
    }
    if (this.used + chunk.length > this.buffer.length) await this.flush();
    this.buffer.set(chunk, this.used);
    this.used += chunk.length;
  }

  async flush(): Promise<void> {
    if (this.used === 0) return;
    await this.writeFully(this.buffer.subarray(0, this.used));
    this.used = 0;
  }

  private async writeFully(data: Uint8Array): Promise<void> {
    let done = 0;
    while (done < data.length) {
      const { bytesWritten } = await this.fh.write(data, done, data.length - done, this.written);
      done += bytesWritten;
      this.written += bytesWritten;
    }
  }
}

export function isChunkIterable(value: unknown): value is TensorChunks {
  return (
    value !== null &&
    typeof value === "object" &&
    !(value instanceof Uint8Array) &&
    (Symbol.iterator in value || Symbol.asyncIterator in value)
  );
}

/**
 * Writes a safetensors file tensor by tensor: only the tensor (or chunk) being written is ever in
 * memory. The file appears at `path` only when complete — it is written to `path + ".tmp"`,
 * synced, then renamed — and the temporary file is removed on any failure, so no half-written
 * model is left behind. A tensor whose data is not exactly the size its dtype and shape need is
 * an error.
 */
export async function writeSafetensors(
  path: string,
  metadata: Record<string, string>,
  tensors: ReadonlyArray<TensorToWrite>,
  options: WriteSafetensorsOptions = {},
): Promise<WriteSafetensorsResult> {
  const { header, dataBytes, offsets } = encodeSafetensorsHeader(metadata, tensors);
  const tmp = `${path}.tmp`;
  const fh = await fs.open(tmp, "w");
  let closed = false;
  try {
    const out = new BufferedFileWriter(fh);
    await out.write(header);
    let dataWritten = 0;
    for (let i = 0; i < tensors.length; i++) {
      const t = tensors[i]!;
      const [b, e] = offsets[i]!;
      const expected = e - b;
      await writeTensorData(out, t, expected, `${t.dtype} [${t.shape.join(", ")}]`, (bytes) => {
        dataWritten += bytes;
        options.onProgress?.(dataWritten, dataBytes);
      });
    }
    await out.flush();
    await fh.sync();
    await fh.close();
    closed = true;
    await fs.rename(tmp, path);
    return {
      path,
      bytes: header.length + dataBytes,
      headerBytes: header.length - 8,
      dataStart: header.length,
    };
  } catch (err) {
    if (!closed) await fh.close().catch(() => undefined);
    await fs.rm(tmp, { force: true }).catch(() => undefined);
    throw err;
  }
}
