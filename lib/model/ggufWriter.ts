/**
 * GGUF v3 writer: metadata of any GGUF value type and tensors of any ggml type, streamed tensor by
 * tensor (only the chunk being written is in memory) and written atomically, like
 * writeSafetensors: to `path + ".tmp"`, synced, then renamed, and removed on any failure.
 *
 * Layout written (the one ggml's gguf_write_to_file produces): header · metadata · tensor infos ·
 * zero padding to the alignment · each tensor's data followed by zero padding to the alignment,
 * so every tensor offset is a multiple of the alignment and the file size is too.
 */
import { promises as fs } from "node:fs";
import { ggmlNbytes, ggmlType, type GgmlTypeName } from "./ggmlTypes";
import {
  GGUF_DEFAULT_ALIGNMENT,
  GGUF_MAX_DIMS,
  GGUF_VALUE_TYPES,
  type GgufArray,
  type GgufValue,
  type GgufValueType,
} from "./gguf";
import { BufferedFileWriter, writeTensorData, type TensorChunks } from "./safetensors";

/** One tensor to write. Its data is pulled only when the writer reaches it. */
export interface GgufTensorToWrite {
  name: string;
  /** ggml type name ("f32", "q8_0", …; case-insensitive). */
  type: GgmlTypeName | string;
  /** Dimensions in ggml order (ne[0] innermost): the reverse of the row-major shape. */
  ne: number[];
  /**
   * Exactly ggml_nbytes(type, ne) bytes, or a function called once, when the tensor's turn comes,
   * returning the bytes or chunks of them.
   */
  data: Uint8Array | (() => Uint8Array | TensorChunks | Promise<Uint8Array>);
}

export interface WriteGgufOptions {
  /**
   * Alignment of tensor data; a power of two. Written as `general.alignment` when not the default
   * (a `general.alignment` entry in the metadata is replaced by this).
   * @default 32
   */
  alignment?: number;
  /** Called after each chunk with the bytes of tensor data written so far and the total. */
  onProgress?: (written: number, total: number) => void;
}

export interface WriteGgufResult {
  path: string;
  /** File size. */
  bytes: number;
  /** Absolute offset of the data section. */
  dataStart: number;
}

/** Metadata to write: typed values, in insertion order. */
export type GgufMetadataInput = Map<string, GgufValue> | Record<string, GgufValue>;

const TYPE_ID = new Map<GgufValueType, number>(GGUF_VALUE_TYPES.map((t, i) => [t, i]));

const INT_RANGE: Partial<Record<GgufValueType, [number, number]>> = {
  uint8: [0, 0xff],
  int8: [-0x80, 0x7f],
  uint16: [0, 0xffff],
  int16: [-0x8000, 0x7fff],
  uint32: [0, 0xffffffff],
  int32: [-0x80000000, 0x7fffffff],
};

/** Growable little-endian byte buffer for the header. */
class ByteSink {
  private buf = new Uint8Array(4096);
  private view = new DataView(this.buf.buffer);
  length = 0;

  // Callers reserve before reading `this.view`: growing replaces it, and `this.view.setX(
  // this.reserve(n), …)` would write through the old one (its receiver is read first).
  private reserve(n: number): number {
    if (this.length + n > this.buf.length) {
      const next = new Uint8Array(Math.max(this.buf.length * 2, this.length + n));
      next.set(this.buf.subarray(0, this.length));
      this.buf = next;
      this.view = new DataView(next.buffer);
    }
    const at = this.length;
    this.length += n;
    return at;
  }

  bytes(data: Uint8Array): void {
    const at = this.reserve(data.length);
    this.buf.set(data, at);
  }
  u8(v: number): void {
    const at = this.reserve(1);
    this.view.setUint8(at, v);
  }
  i8(v: number): void {
    const at = this.reserve(1);
    this.view.setInt8(at, v);
  }
  u16(v: number): void {
    const at = this.reserve(2);
    this.view.setUint16(at, v, true);
  }
  i16(v: number): void {
    const at = this.reserve(2);
    this.view.setInt16(at, v, true);
  }
  u32(v: number): void {
    const at = this.reserve(4);
    this.view.setUint32(at, v, true);
  }
  i32(v: number): void {
    const at = this.reserve(4);
    this.view.setInt32(at, v, true);
  }
  f32(v: number): void {
    const at = this.reserve(4);
    this.view.setFloat32(at, v, true);
  }
  f64(v: number): void {
    const at = this.reserve(8);
    this.view.setFloat64(at, v, true);
  }
  u64(v: bigint | number): void {
    const at = this.reserve(8);
    this.view.setBigUint64(at, BigInt(v), true);
  }
  i64(v: bigint): void {
    const at = this.reserve(8);
    this.view.setBigInt64(at, v, true);
  }
  string(s: string): void {
    const encoded = new TextEncoder().encode(s);
    this.u64(encoded.length);
    this.bytes(encoded);
  }
  padTo(alignment: number): void {
    const padded = Math.ceil(this.length / alignment) * alignment;
    this.reserve(padded - this.length); // bytes past `length` are always still zero
  }
  result(): Uint8Array {
    return this.buf.slice(0, this.length);
  }
}

function writeScalar(sink: ByteSink, type: GgufValueType, value: unknown, what: string): void {
  const range = INT_RANGE[type];
  if (range) {
    if (
      typeof value !== "number" ||
      !Number.isInteger(value) ||
      value < range[0] ||
      value > range[1]
    ) {
      throw new RangeError(`${what}: ${String(value)} is not a ${type}`);
    }
  }
  switch (type) {
    case "uint8":
      return sink.u8(value as number);
    case "int8":
      return sink.i8(value as number);
    case "uint16":
      return sink.u16(value as number);
    case "int16":
      return sink.i16(value as number);
    case "uint32":
      return sink.u32(value as number);
    case "int32":
      return sink.i32(value as number);
    case "float32":
    case "float64":
      if (typeof value !== "number")
        throw new TypeError(`${what}: ${String(value)} is not a number`);
      return type === "float32" ? sink.f32(value) : sink.f64(value);
    case "uint64":
    case "int64": {
      if (typeof value !== "bigint") throw new TypeError(`${what}: ${type} values must be bigints`);
      const ok =
        type === "uint64"
          ? BigInt.asUintN(64, value) === value
          : BigInt.asIntN(64, value) === value;
      if (!ok) throw new RangeError(`${what}: ${value} is not a ${type}`);
      return type === "uint64" ? sink.u64(value) : sink.i64(value);
    }
    case "bool":
      if (typeof value !== "boolean")
        throw new TypeError(`${what}: ${String(value)} is not a boolean`);
      return sink.u8(value ? 1 : 0);
    case "string":
      if (typeof value !== "string")
        throw new TypeError(`${what}: ${String(value)} is not a string`);
      return sink.string(value);
    case "array":
      return writeArray(sink, value as GgufArray, what);
  }
}

function writeArray(sink: ByteSink, array: GgufArray, what: string): void {
  if (!array || !TYPE_ID.has(array.itemType) || array.items === undefined) {
    throw new TypeError(`${what}: an array value needs { itemType, items }`);
  }
  sink.u32(TYPE_ID.get(array.itemType)!);
  const items = array.items as ArrayLike<unknown>;
  sink.u64(items.length);
  for (let i = 0; i < items.length; i++)
    writeScalar(sink, array.itemType, items[i], `${what}[${i}]`);
}

function entries(metadata: GgufMetadataInput): [string, GgufValue][] {
  return metadata instanceof Map ? [...metadata] : Object.entries(metadata);
}

/**
 * The header bytes (magic through the padding before the data) for `tensors` laid out in order,
 * each at an aligned offset, and the offsets and total padded data size. Throws TypeError /
 * RangeError for metadata or tensors it cannot encode (bad types, duplicate names, a shape whose
 * ne[0] is not a whole number of blocks).
 */
export function encodeGgufHeader(
  metadata: GgufMetadataInput,
  tensors: ReadonlyArray<Pick<GgufTensorToWrite, "name" | "type" | "ne">>,
  alignment: number = GGUF_DEFAULT_ALIGNMENT,
): { header: Uint8Array; offsets: number[]; sizes: number[]; dataBytes: number } {
  if (!Number.isSafeInteger(alignment) || alignment <= 0 || (alignment & (alignment - 1)) !== 0) {
    throw new RangeError(`GGUF alignment must be a power of two (got ${alignment})`);
  }
  const kvs = entries(metadata).filter(([key]) => key !== "general.alignment");
  if (alignment !== GGUF_DEFAULT_ALIGNMENT) {
    kvs.push(["general.alignment", { type: "uint32", value: alignment }]);
  }
  const sink = new ByteSink();
  sink.bytes(new TextEncoder().encode("GGUF"));
  sink.u32(3);
  sink.u64(tensors.length);
  sink.u64(kvs.length);
  for (const [key, value] of kvs) {
    if (key.length === 0) throw new TypeError(`GGUF metadata keys must not be empty`);
    const id = TYPE_ID.get(value?.type);
    if (id === undefined) {
      throw new TypeError(`GGUF metadata "${key}": unknown value type ${String(value?.type)}`);
    }
    sink.string(key);
    sink.u32(id);
    writeScalar(sink, value.type, value.value, `GGUF metadata "${key}"`);
  }
  const offsets: number[] = [];
  const sizes: number[] = [];
  const seen = new Set<string>();
  let at = 0;
  for (const t of tensors) {
    if (t.name.length === 0) throw new TypeError(`GGUF tensor names must not be empty`);
    if (seen.has(t.name)) throw new TypeError(`duplicate tensor name "${t.name}"`);
    seen.add(t.name);
    if (t.ne.length === 0 || t.ne.length > GGUF_MAX_DIMS) {
      throw new RangeError(`tensor "${t.name}": ${t.ne.length} dimensions (GGUF allows 1 to 4)`);
    }
    const traits = ggmlType(t.type);
    let bytes: number;
    try {
      bytes = ggmlNbytes(traits, t.ne);
    } catch (err) {
      throw new RangeError(`tensor "${t.name}": ${(err as Error).message}`, { cause: err });
    }
    sink.string(t.name);
    sink.u32(t.ne.length);
    for (const d of t.ne) sink.u64(d);
    sink.u32(traits.id);
    sink.u64(at);
    offsets.push(at);
    sizes.push(bytes);
    at += Math.ceil(bytes / alignment) * alignment;
  }
  sink.padTo(alignment);
  return { header: sink.result(), offsets, sizes, dataBytes: at };
}

/**
 * Writes a GGUF v3 file tensor by tensor: only the tensor (or chunk) being written is in memory.
 * The file appears at `path` only when complete (written to `path + ".tmp"`, synced, renamed);
 * the temporary file is removed on any failure. A tensor whose data is not exactly
 * ggml_nbytes(type, ne) bytes is an error.
 */
export async function writeGguf(
  path: string,
  metadata: GgufMetadataInput,
  tensors: ReadonlyArray<GgufTensorToWrite>,
  options: WriteGgufOptions = {},
): Promise<WriteGgufResult> {
  const alignment = options.alignment ?? GGUF_DEFAULT_ALIGNMENT;
  const { header, sizes, dataBytes } = encodeGgufHeader(metadata, tensors, alignment);
  const padding = new Uint8Array(alignment);
  const tmp = `${path}.tmp`;
  const fh = await fs.open(tmp, "w");
  let closed = false;
  try {
    const out = new BufferedFileWriter(fh);
    await out.write(header);
    let dataWritten = 0;
    for (let i = 0; i < tensors.length; i++) {
      const t = tensors[i]!;
      const expected = sizes[i]!;
      await writeTensorData(out, t, expected, `${t.type} ne [${t.ne.join(", ")}]`, (bytes) => {
        dataWritten += bytes;
        options.onProgress?.(dataWritten, dataBytes);
      });
      const pad = (alignment - (expected % alignment)) % alignment;
      if (pad > 0) {
        await out.write(padding.subarray(0, pad));
        dataWritten += pad;
        options.onProgress?.(dataWritten, dataBytes);
      }
    }
    await out.flush();
    await fh.sync();
    await fh.close();
    closed = true;
    await fs.rename(tmp, path);
    return { path, bytes: header.length + dataBytes, dataStart: header.length };
  } catch (err) {
    if (!closed) await fh.close().catch(() => undefined);
    await fs.rm(tmp, { force: true }).catch(() => undefined);
    throw err;
  }
}
