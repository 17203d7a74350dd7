/**
 * GGUF header reader: metadata and tensor infos, never tensor data, so a multi-GB model is
 * inspected and planned by reading only its first few MB.
 *
 * Layout (ggml docs/gguf.md; ggml/src/gguf.cpp), all little-endian:
 *   magic "GGUF" · u32 version (2 or 3) · u64 tensor_count · u64 metadata_kv_count
 *   metadata_kv_count × { string key · u32 value_type · value }
 *   tensor_count × { string name · u32 n_dims · u64 ne[n_dims] · u32 ggml_type · u64 offset }
 *   padding to `general.alignment` (default 32) · tensor data
 * where string = u64 length + UTF-8 bytes (no terminator), and an array value is
 * u32 item_type · u64 count · items. A tensor's data starts at data_start + offset; offsets are
 * multiples of the alignment. ne is in ggml order (ne[0] is the innermost, contiguous dimension),
 * the reverse of the row-major shape safetensors and PyTorch use.
 *
 * Bad input never escapes as anything but a ModelFormatError naming the file, the field and the
 * problem. Reading is bounded: the header is read in growing chunks only as far as the counts
 * need, every count is checked against the bytes left in the file before anything is allocated,
 * and the whole header is capped (`maxHeaderBytes`).
 */
import { promises as fs } from "node:fs";
import { openRegularFile } from "./openRegularFile";
import {
  GGML_REMOVED_TYPE_IDS,
  ggmlTypeById,
  type GgmlTypeName,
  type GgmlTypeTraits,
} from "./ggmlTypes";
import { ModelFormatError } from "./safetensors";

/** The 4 bytes every GGUF file starts with. */
export const GGUF_MAGIC = "GGUF";
/** Versions this reader understands: v2 and v3 share the layout (v3 added big-endian files). */
export const GGUF_SUPPORTED_VERSIONS: readonly number[] = [2, 3];
/** Alignment of tensor data when `general.alignment` is absent. */
export const GGUF_DEFAULT_ALIGNMENT = 32;
/** ggml's limit on tensor dimensions (GGML_MAX_DIMS). */
export const GGUF_MAX_DIMS = 4;
/** More tensors than this is taken as corruption: the largest real models have a few thousand. */
export const GGUF_MAX_TENSORS = 1_000_000;
/** No single string (key, value, tensor name) may be longer than this. */
export const GGUF_MAX_STRING_BYTES = 1 << 30;
/**
 * Arrays may nest (the format allows arrays of arrays; ggml itself writes none): deeper than this
 * is corruption, and the bound keeps a crafted file from exhausting the stack.
 */
export const GGUF_MAX_ARRAY_DEPTH = 8;

/** GGUF metadata value types, indexed by their id in the file. */
export const GGUF_VALUE_TYPES = [
  "uint8",
  "int8",
  "uint16",
  "int16",
  "uint32",
  "int32",
  "float32",
  "bool",
  "string",
  "array",
  "uint64",
  "int64",
  "float64",
] as const;

export type GgufValueType = (typeof GGUF_VALUE_TYPES)[number];

/** Bytes of one value of each fixed-size type. */
export const GGUF_SCALAR_BYTES: Readonly<Partial<Record<GgufValueType, number>>> = {
  uint8: 1,
  int8: 1,
  uint16: 2,
  int16: 2,
  uint32: 4,
  int32: 4,
  float32: 4,
  bool: 1,
  uint64: 8,
  int64: 8,
  float64: 8,
};

/** The items of an array value; numeric arrays are typed arrays (compact for 100k-token vocabularies). */
export type GgufArrayItems =
  | Uint8Array
  | Int8Array
  | Uint16Array
  | Int16Array
  | Uint32Array
  | Int32Array
  | Float32Array
  | Float64Array
  | BigUint64Array
  | BigInt64Array
  | boolean[]
  | string[]
  | GgufArray[];

/** An array value: the type of its items and the items. */
export interface GgufArray {
  itemType: GgufValueType;
  items: GgufArrayItems;
}

/** One typed metadata value. 64-bit integers are bigints, so no value loses precision. */
export type GgufValue =
  | {
      type: "uint8" | "int8" | "uint16" | "int16" | "uint32" | "int32" | "float32" | "float64";
      value: number;
    }
  | { type: "uint64" | "int64"; value: bigint }
  | { type: "bool"; value: boolean }
  | { type: "string"; value: string }
  | { type: "array"; value: GgufArray };

/** One tensor of a GGUF file. */
export interface GgufTensor {
  name: string;
  /** ggml type name ("f16", "q8_0", …). */
  type: GgmlTypeName;
  /** ggml type id as stored. */
  typeId: number;
  /** Dimensions in ggml order: ne[0] is the innermost (contiguous) one. */
  ne: number[];
  /** Row-major shape (safetensors/PyTorch order): ne reversed. */
  shape: number[];
  /** Offset relative to the data section, as stored. */
  offset: number;
  /** Absolute file offset of the first byte. */
  begin: number;
  /** Absolute file offset one past the last byte. */
  end: number;
  /** ggml_nbytes: end − begin. */
  bytes: number;
}

export interface GgufHeader {
  path: string;
  /** 2 or 3. */
  version: number;
  /** Total file size. */
  fileBytes: number;
  /** `general.alignment`, or 32. */
  alignment: number;
  /** Absolute offset of the end of the tensor infos (before padding). */
  headerBytes: number;
  /** Absolute offset of the data section: headerBytes rounded up to the alignment. */
  dataStart: number;
  /** Metadata in file order. */
  metadata: Map<string, GgufValue>;
  /** Tensors in tensor-info order (the order ggml loads them). */
  tensors: GgufTensor[];
}

export interface ReadGgufOptions {
  /**
   * Refuse headers (metadata + tensor infos) larger than this. Real headers are a few MB — the
   * tokenizer vocabulary dominates — so a larger one means corruption, and the cap bounds memory.
   * @default 256 MiB
   */
  maxHeaderBytes?: number;
}

const DEFAULT_MAX_HEADER_BYTES = 256 << 20;
const FIRST_CHUNK = 64 << 10;
const MAX_CHUNK = 8 << 20;

/** Smallest encoding of one metadata kv: key length (8) + type (4) + a 1-byte value. */
const MIN_KV_BYTES = 13;
/** Smallest tensor info: name length (8) + 1-byte name + n_dims (4) + ne[0] (8) + type (4) + offset (8). */
const MIN_TENSOR_INFO_BYTES = 33;

/**
 * A forward-only cursor over the file that keeps a window of it in memory and refills the window
 * in growing chunks. Every read is checked against the file size first, so a length field is
 * never trusted with an allocation larger than what the file really holds.
 */
class HeaderCursor {
  private buf = new Uint8Array(0);
  private view = new DataView(this.buf.buffer);
  /** File offset of buf[0]. */
  private bufStart = 0;
  private chunk = FIRST_CHUNK;
  /** File offset of the next byte to read. */
  pos = 0;

  constructor(
    private readonly fh: fs.FileHandle,
    readonly path: string,
    readonly fileBytes: number,
    private readonly maxHeaderBytes: number,
  ) {}

  fail(problem: string): never {
    throw new ModelFormatError(`${this.path}: ${problem}`);
  }

  /** Bytes between the cursor and the end of the file. */
  get remaining(): number {
    return this.fileBytes - this.pos;
  }

  /** Makes [pos, pos + n) available in the window, or fails naming `what` was being read. */
  async need(n: number, what: string): Promise<void> {
    if (this.pos + n > this.maxHeaderBytes) {
      this.fail(
        `header is larger than the ${this.maxHeaderBytes}-byte limit (reading ${what} at byte ${this.pos}); corrupt, or raise maxHeaderBytes`,
      );
    }
    if (this.pos + n <= this.bufStart + this.buf.length) return;
    if (n > this.remaining) {
      this.fail(
        `truncated: ${what} at byte ${this.pos} needs ${n} bytes, but the file ends at byte ${this.fileBytes}`,
      );
    }
    // Read ahead a chunk, but never past the end of the file or the header cap.
    const length = Math.min(
      Math.max(n, this.chunk),
      this.remaining,
      this.maxHeaderBytes - this.pos,
    );
    this.chunk = Math.min(this.chunk * 2, MAX_CHUNK);
    const buffer = new Uint8Array(length);
    let filled = 0;
    while (filled < length) {
      const { bytesRead } = await this.fh.read(buffer, filled, length - filled, this.pos + filled);
      if (bytesRead === 0) break;
      filled += bytesRead;
    }
    if (filled < n) this.fail(`file shrank while reading ${what} at byte ${this.pos}`);
    this.buf = buffer.subarray(0, filled);
    this.view = new DataView(buffer.buffer, 0, filled);
    this.bufStart = this.pos;
  }

  private at(n: number): number {
    const offset = this.pos - this.bufStart;
    this.pos += n;
    return offset;
  }

  async u32(what: string): Promise<number> {
    await this.need(4, what);
    return this.view.getUint32(this.at(4), true);
  }

  async u64(what: string): Promise<bigint> {
    await this.need(8, what);
    return this.view.getBigUint64(this.at(8), true);
  }

  /** A copy of the next n bytes (the caller has bounded n against `remaining`). */
  async bytes(n: number, what: string): Promise<Uint8Array> {
    await this.need(n, what);
    const offset = this.at(n);
    return this.buf.slice(offset, offset + n);
  }

  async scalar(type: GgufValueType, what: string): Promise<number | bigint | boolean> {
    const size = GGUF_SCALAR_BYTES[type]!;
    await this.need(size, what);
    const at = this.at(size);
    const v = this.view;
    switch (type) {
      case "uint8":
        return v.getUint8(at);
      case "int8":
        return v.getInt8(at);
      case "uint16":
        return v.getUint16(at, true);
      case "int16":
        return v.getInt16(at, true);
      case "uint32":
        return v.getUint32(at, true);
      case "int32":
        return v.getInt32(at, true);
      case "float32":
        return v.getFloat32(at, true);
      case "float64":
        return v.getFloat64(at, true);
      case "uint64":
        return v.getBigUint64(at, true);
      case "int64":
        return v.getBigInt64(at, true);
      case "bool":
        // ggml writes 0 or 1; any other byte is read as true, like a C bool cast.
        return v.getUint8(at) !== 0;
      default:
        return this.fail(`internal: ${type} is not a scalar type`);
    }
  }

  async string(what: string): Promise<string> {
    const length = await this.u64(`length of ${what}`);
    if (length > BigInt(GGUF_MAX_STRING_BYTES)) {
      this.fail(
        `${what} at byte ${this.pos - 8} claims ${length} bytes, over the ${GGUF_MAX_STRING_BYTES}-byte limit for a string; corrupt`,
      );
    }
    if (length > BigInt(this.remaining)) {
      this.fail(
        `truncated: ${what} at byte ${this.pos - 8} claims ${length} bytes, but only ${this.remaining} remain in the file`,
      );
    }
    const n = Number(length);
    await this.need(n, what);
    const offset = this.at(n);
    try {
      return UTF8.decode(this.buf.subarray(offset, offset + n));
    } catch {
      return this.fail(`${what} at byte ${this.pos - n} is not valid UTF-8`);
    }
  }
}

const UTF8 = new TextDecoder("utf-8", { fatal: true });

function valueTypeName(id: number): GgufValueType | undefined {
  return GGUF_VALUE_TYPES[id];
}

/** Smallest encoding of one item of `type` (strings and arrays carry at least their length). */
function minItemBytes(type: GgufValueType): number {
  if (type === "string") return 8;
  if (type === "array") return 12;
  return GGUF_SCALAR_BYTES[type]!;
}

async function readArray(cur: HeaderCursor, what: string, depth: number): Promise<GgufArray> {
  if (depth > GGUF_MAX_ARRAY_DEPTH) {
    cur.fail(`${what}: arrays nested deeper than ${GGUF_MAX_ARRAY_DEPTH} levels; corrupt`);
  }
  const typeId = await cur.u32(`item type of ${what}`);
  const itemType = valueTypeName(typeId);
  if (itemType === undefined) {
    cur.fail(
      `${what} has unknown item type ${typeId} at byte ${cur.pos - 4} (known: 0–12, ${GGUF_VALUE_TYPES.join(", ")})`,
    );
  }
  const count = await cur.u64(`item count of ${what}`);
  const minBytes = minItemBytes(itemType);
  // Check the count against the file before looping or allocating: a corrupt 2^60 must fail here.
  if (count * BigInt(minBytes) > BigInt(cur.remaining)) {
    cur.fail(
      `${what}: array of ${count} ${itemType} items at byte ${cur.pos - 8} cannot fit in the ${cur.remaining} bytes left in the file; truncated or corrupt`,
    );
  }
  const n = Number(count);
  const size = GGUF_SCALAR_BYTES[itemType];
  if (size !== undefined && itemType !== "bool") {
    // slice() copies into a fresh, aligned ArrayBuffer; the file is little-endian like every
    // platform Node runs on, so the typed array reads the values directly.
    const raw = (await cur.bytes(n * size, what)).buffer;
    switch (itemType) {
      case "uint8":
        return { itemType, items: new Uint8Array(raw) };
      case "int8":
        return { itemType, items: new Int8Array(raw) };
      case "uint16":
        return { itemType, items: new Uint16Array(raw) };
      case "int16":
        return { itemType, items: new Int16Array(raw) };
      case "uint32":
        return { itemType, items: new Uint32Array(raw) };
      case "int32":
        return { itemType, items: new Int32Array(raw) };
      case "float32":
        return { itemType, items: new Float32Array(raw) };
      case "float64":
        return { itemType, items: new Float64Array(raw) };
      case "uint64":
        return { itemType, items: new BigUint64Array(raw) };
      case "int64":
        return { itemType, items: new BigInt64Array(raw) };
    }
  }
  if (itemType === "bool") {
    const raw = await cur.bytes(n, what);
    return { itemType, items: Array.from(raw, (b) => b !== 0) };
  }
  if (itemType === "string") {
    const items: string[] = [];
    for (let i = 0; i < n; i++) items.push(await cur.string(`${what}[${i}]`));
    return { itemType, items };
  }
  const items: GgufArray[] = [];
  for (let i = 0; i < n; i++) items.push(await readArray(cur, `${what}[${i}]`, depth + 1));
  return { itemType, items };
}

async function readValue(cur: HeaderCursor, type: GgufValueType, what: string): Promise<GgufValue> {
  switch (type) {
    case "string":
      return { type, value: await cur.string(what) };
    case "array":
      return { type, value: await readArray(cur, what, 1) };
    case "bool":
      return { type, value: (await cur.scalar(type, what)) as boolean };
    case "uint64":
    case "int64":
      return { type, value: (await cur.scalar(type, what)) as bigint };
    default:
      return { type, value: (await cur.scalar(type, what)) as number };
  }
}

function isPowerOfTwo(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

/** Describes a metadata value briefly for an error message. */
function brief(value: GgufValue): string {
  if (value.type === "array")
    return `an array of ${value.value.items.length} ${value.value.itemType}`;
  return `${value.type} ${typeof value.value === "string" ? JSON.stringify(value.value) : String(value.value)}`;
}

/**
 * Reads and validates a GGUF file's header — metadata and tensor infos — without reading tensor
 * data. Every problem (truncation anywhere, wrong magic, unsupported version, absurd counts or
 * lengths, unknown value or ggml types, bad dimensions, misaligned, overlapping or out-of-file
 * tensor data, duplicate keys or names) is a ModelFormatError naming the file and what is wrong.
 */
export async function readGgufHeader(
  path: string,
  options: ReadGgufOptions = {},
): Promise<GgufHeader> {
  const maxHeaderBytes = options.maxHeaderBytes ?? DEFAULT_MAX_HEADER_BYTES;
  const { fh, info } = await openRegularFile(path);
  try {
    const fileBytes = info.size;
    const cur: HeaderCursor = new HeaderCursor(fh, path, fileBytes, maxHeaderBytes);
    if (fileBytes < 4) {
      cur.fail(`file is too short to be GGUF (${fileBytes} bytes; the magic alone needs 4)`);
    }
    const magic = await cur.bytes(4, "magic");
    if (String.fromCharCode(...magic) !== GGUF_MAGIC) {
      cur.fail(`not a GGUF file: it does not start with "GGUF" (47 47 55 46)`);
    }
    const version = await cur.u32("version");
    if (version === 1) {
      cur.fail(
        `GGUF version 1 is not supported (its counts and lengths are 32-bit); convert the model again with a current llama.cpp`,
      );
    }
    if (!GGUF_SUPPORTED_VERSIONS.includes(version)) {
      // A big-endian file stores version 3 as 00 00 00 03, which reads as 0x03000000 here.
      const bigEndian =
        (version & 0x00ffffff) === 0 && GGUF_SUPPORTED_VERSIONS.includes(version >>> 24);
      cur.fail(
        `unsupported GGUF version ${version}${bigEndian ? " (a big-endian GGUF file; only little-endian files are supported)" : ""}; supported: 2, 3`,
      );
    }
    const tensorCount = await cur.u64("tensor count");
    const kvCount = await cur.u64("metadata count");
    if (tensorCount > BigInt(GGUF_MAX_TENSORS)) {
      cur.fail(`tensor count ${tensorCount} is absurd (limit ${GGUF_MAX_TENSORS}); corrupt`);
    }
    if (
      kvCount * BigInt(MIN_KV_BYTES) + tensorCount * BigInt(MIN_TENSOR_INFO_BYTES) >
      BigInt(cur.remaining)
    ) {
      cur.fail(
        `${kvCount} metadata entries and ${tensorCount} tensor infos cannot fit in the ${fileBytes}-byte file; truncated or corrupt`,
      );
    }

    const metadata = new Map<string, GgufValue>();
    const kvs = Number(kvCount);
    for (let i = 0; i < kvs; i++) {
      const key = await cur.string(`key of metadata entry #${i}`);
      if (metadata.has(key)) cur.fail(`duplicate metadata key "${key}" (entry #${i})`);
      const typeId = await cur.u32(`value type of "${key}"`);
      const type = valueTypeName(typeId);
      if (type === undefined) {
        cur.fail(
          `metadata "${key}" has unknown value type ${typeId} at byte ${cur.pos - 4} (known: 0–12, ${GGUF_VALUE_TYPES.join(", ")})`,
        );
      }
      metadata.set(key, await readValue(cur, type, `value of "${key}"`));
    }

    let alignment = GGUF_DEFAULT_ALIGNMENT;
    const alignValue = metadata.get("general.alignment");
    if (alignValue !== undefined) {
      // ggml requires a u32; accepting other types would read a file ggml itself refuses.
      if (alignValue.type !== "uint32" || !isPowerOfTwo(alignValue.value)) {
        cur.fail(`"general.alignment" must be a uint32 power of two, got ${brief(alignValue)}`);
      }
      alignment = alignValue.value as number;
    }

    const tensors: GgufTensor[] = [];
    const names = new Set<string>();
    const count = Number(tensorCount);
    for (let i = 0; i < count; i++) {
      const name = await cur.string(`name of tensor #${i}`);
      if (name.length === 0) cur.fail(`tensor #${i} has an empty name`);
      if (names.has(name)) cur.fail(`duplicate tensor name "${name}" (tensor #${i})`);
      names.add(name);
      const where = `tensor "${name}"`;
      const nDims = await cur.u32(`dimension count of ${where}`);
      if (nDims === 0 || nDims > GGUF_MAX_DIMS) {
        cur.fail(`${where} has ${nDims} dimensions; ggml allows 1 to ${GGUF_MAX_DIMS}`);
      }
      const ne: number[] = [];
      let elements = 1n;
      for (let d = 0; d < nDims; d++) {
        const n = await cur.u64(`ne[${d}] of ${where}`);
        // int64 in ggml; anything past 2^53 cannot be a real dimension of a file that exists.
        if (n > BigInt(Number.MAX_SAFE_INTEGER)) {
          cur.fail(`${where} has an absurd dimension ne[${d}] = ${n}; corrupt`);
        }
        ne.push(Number(n));
        elements *= n;
      }
      if (elements > 0x7fffffffffffffffn) {
        cur.fail(`${where} shape [${ne.join(", ")}] (ggml order) overflows int64`);
      }
      const typeId = await cur.u32(`type of ${where}`);
      const traits: GgmlTypeTraits | undefined = ggmlTypeById(typeId);
      if (!traits) {
        const removed = GGML_REMOVED_TYPE_IDS.get(typeId);
        cur.fail(
          removed
            ? `${where} has ggml type ${typeId} (${removed}), which ggml has removed; re-quantize the model`
            : `${where} has unknown ggml type ${typeId}`,
        );
      }
      const offset = await cur.u64(`data offset of ${where}`);
      if (ne[0]! % traits.blockSize !== 0) {
        cur.fail(
          `${where}: ne[0] = ${ne[0]} is not a multiple of the ${traits.name} block size ${traits.blockSize} (shape [${ne.join(", ")}], ggml order)`,
        );
      }
      const bytes =
        elements === 0n ? 0n : (elements / BigInt(traits.blockSize)) * BigInt(traits.typeSize);
      if (offset > BigInt(fileBytes) || bytes > BigInt(fileBytes)) {
        cur.fail(
          `${where} (${traits.name} [${ne.join(", ")}], ${bytes} bytes at data offset ${offset}) runs past the end of the ${fileBytes}-byte file; truncated or corrupt`,
        );
      }
      const offsetNumber = Number(offset);
      if (offsetNumber % alignment !== 0) {
        cur.fail(`${where} data offset ${offset} is not a multiple of the alignment ${alignment}`);
      }
      const shape = ne.slice().reverse();
      tensors.push({
        name,
        type: traits.name,
        typeId,
        ne,
        shape,
        offset: offsetNumber,
        begin: 0,
        end: 0,
        bytes: Number(bytes),
      });
    }

    const headerBytes = cur.pos;
    const dataStart = Math.ceil(headerBytes / alignment) * alignment;
    for (const t of tensors) {
      t.begin = dataStart + t.offset;
      t.end = t.begin + t.bytes;
      if (t.end > fileBytes) {
        cur.fail(
          `tensor "${t.name}" (${t.type} [${t.ne.join(", ")}], ${t.bytes} bytes) at data offset ${t.offset} ends at byte ${t.end}, past the end of the ${fileBytes}-byte file; truncated?`,
        );
      }
    }
    const byBegin = tensors.filter((t) => t.bytes > 0).sort((a, b) => a.begin - b.begin);
    for (let i = 1; i < byBegin.length; i++) {
      const prev = byBegin[i - 1]!;
      const cur2 = byBegin[i]!;
      if (cur2.begin < prev.end) {
        cur.fail(
          `tensor "${cur2.name}" data [${cur2.offset}, ${cur2.offset + cur2.bytes}) overlaps tensor "${prev.name}" [${prev.offset}, ${prev.offset + prev.bytes})`,
        );
      }
    }
    return { path, version, fileBytes, alignment, headerBytes, dataStart, metadata, tensors };
  } finally {
    await fh.close();
  }
}

/** The tensor named `name`, or a ModelFormatError naming what is missing. */
export function findGgufTensor(header: GgufHeader, name: string): GgufTensor {
  const tensor = header.tensors.find((t) => t.name === name);
  if (!tensor) throw new ModelFormatError(`${header.path}: no tensor named "${name}"`);
  return tensor;
}

/** A 64-bit integer as a JSON number when exact, else as a decimal string. */
function bigintToJson(value: bigint): number | string {
  return value >= BigInt(Number.MIN_SAFE_INTEGER) && value <= BigInt(Number.MAX_SAFE_INTEGER)
    ? Number(value)
    : value.toString();
}

/**
 * The shortest decimal that reads back as the same float32: 1e-5 rather than the float32's exact
 * 0.000009999999747378752, which is what the file's writer meant.
 */
export function shortestFloat32(value: number): number {
  if (!Number.isFinite(value) || value === 0) return value;
  for (let digits = 1; digits < 9; digits++) {
    const candidate = Number(value.toPrecision(digits));
    if (Math.fround(candidate) === value) return candidate;
  }
  return Number(value.toPrecision(9));
}

/** A float as JSON: non-finite values (NaN, ±Infinity) as strings, since JSON has none. */
function floatToJson(value: number, float32: boolean): number | string {
  if (!Number.isFinite(value)) return String(value);
  return float32 ? shortestFloat32(value) : value;
}

function arrayToJson(array: GgufArray): unknown[] {
  const out: unknown[] = [];
  const float32 = array.itemType === "float32";
  const float = float32 || array.itemType === "float64";
  for (const item of array.items as Iterable<unknown>) {
    if (typeof item === "bigint") out.push(bigintToJson(item));
    else if (float) out.push(floatToJson(item as number, float32));
    else if (typeof item === "object" && item !== null) out.push(arrayToJson(item as GgufArray));
    else out.push(item);
  }
  return out;
}

/**
 * A metadata value as plain JSON: numbers, strings, booleans and arrays of them. 64-bit integers
 * beyond 2^53 become decimal strings; float32 values their shortest round-trip decimal;
 * non-finite floats strings.
 */
export function ggufValueToJson(value: GgufValue): unknown {
  switch (value.type) {
    case "uint64":
    case "int64":
      return bigintToJson(value.value);
    case "array":
      return arrayToJson(value.value);
    case "float32":
    case "float64":
      return floatToJson(value.value, value.type === "float32");
    default:
      return value.value;
  }
}

function quote(text: string, maxChars: number): string {
  const shown = text.length > maxChars ? `${text.slice(0, maxChars)}…` : text;
  return JSON.stringify(shown).replace(/…"$/, '"…');
}

/**
 * A one-line human summary of a value: scalars in full (long strings cut at `maxChars`), arrays
 * as `[string × 32000] "<unk>", "<s>", "</s>", …` showing the first few items.
 */
export function summarizeGgufValue(value: GgufValue, maxChars = 80, maxItems = 4): string {
  if (value.type === "string") return quote(value.value, maxChars);
  if (value.type === "float32") return String(shortestFloat32(value.value));
  if (value.type !== "array") return String(value.value);
  return summarizeArray(value.value, maxChars, maxItems);
}

function summarizeArray(array: GgufArray, maxChars: number, maxItems: number): string {
  const items = array.items as ArrayLike<unknown>;
  const shown: string[] = [];
  for (let i = 0; i < Math.min(items.length, maxItems); i++) {
    const item = items[i];
    if (typeof item === "string") shown.push(quote(item, 24));
    else if (array.itemType === "float32") shown.push(String(shortestFloat32(item as number)));
    else if (typeof item === "object" && item !== null) {
      const inner = item as GgufArray;
      shown.push(`[${inner.itemType} × ${inner.items.length}]`);
    } else shown.push(String(item));
  }
  const more = items.length > maxItems ? ", …" : "";
  const text = `[${array.itemType} × ${items.length}]${shown.length ? ` ${shown.join(", ")}${more}` : ""}`;
  return text.length > maxChars + 40 ? `${text.slice(0, maxChars + 39)}…` : text;
}
