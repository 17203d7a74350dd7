/**
 * Shared by the GGUF tests: a byte-level GGUF builder (so tests can write any field, valid or
 * not, without going through the writer under test) and a scanner that finds where each header
 * field of a valid file lives (so the fuzz test can rewrite counts, lengths, types and offsets).
 */

/** Little-endian byte builder with GGUF's primitives. */
export class Bytes {
  private parts: number[] = [];

  get length(): number {
    return this.parts.length;
  }
  raw(bytes: ArrayLike<number>): this {
    for (let i = 0; i < bytes.length; i++) this.parts.push(bytes[i]! & 0xff);
    return this;
  }
  u8(v: number): this {
    return this.raw([v]);
  }
  u32(v: number): this {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, v >>> 0, true);
    return this.raw(b);
  }
  u64(v: number | bigint): this {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigUint64(0, BigInt.asUintN(64, BigInt(v)), true);
    return this.raw(b);
  }
  f32(v: number): this {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setFloat32(0, v, true);
    return this.raw(b);
  }
  str(s: string): this {
    const e = new TextEncoder().encode(s);
    return this.u64(e.length).raw(e);
  }
  /** Zero bytes up to a multiple of `n`. */
  pad(n: number): this {
    while (this.parts.length % n !== 0) this.parts.push(0);
    return this;
  }
  zeros(n: number): this {
    for (let i = 0; i < n; i++) this.parts.push(0);
    return this;
  }
  build(): Uint8Array {
    return Uint8Array.from(this.parts);
  }
}

/** GGUF value type ids. */
export const T = {
  u8: 0,
  i8: 1,
  u16: 2,
  i16: 3,
  u32: 4,
  i32: 5,
  f32: 6,
  bool: 7,
  str: 8,
  arr: 9,
  u64: 10,
  i64: 11,
  f64: 12,
} as const;

export interface TinyTensor {
  name: string;
  ne: number[];
  type: number;
  offset: number;
}

/**
 * A small GGUF: header, the given kvs (already encoded by `kvs`), tensor infos, padding to 32,
 * then `dataBytes` of data. Defaults describe one f32 tensor "w" [8] at offset 0.
 */
export function tinyGguf(
  options: {
    version?: number;
    kvCount?: number;
    kvs?: (b: Bytes) => void;
    tensors?: TinyTensor[];
    tensorCount?: number;
    dataBytes?: number;
    alignment?: number;
  } = {},
): Uint8Array {
  const tensors = options.tensors ?? [{ name: "w", ne: [8], type: 0, offset: 0 }];
  const b = new Bytes().raw([0x47, 0x47, 0x55, 0x46]).u32(options.version ?? 3);
  b.u64(options.tensorCount ?? tensors.length);
  const kvBytes = new Bytes();
  options.kvs?.(kvBytes);
  b.u64(options.kvCount ?? 0);
  b.raw(kvBytes.build());
  for (const t of tensors) {
    b.str(t.name).u32(t.ne.length);
    for (const d of t.ne) b.u64(d);
    b.u32(t.type).u64(t.offset);
  }
  b.pad(options.alignment ?? 32);
  return b.zeros(options.dataBytes ?? 32).build();
}

/** Where a header field of a GGUF file lives, and how wide it is. */
export interface GgufField {
  at: number;
  width: 4 | 8;
  kind:
    | "version"
    | "tensor-count"
    | "kv-count"
    | "string-length"
    | "value-type"
    | "array-item-type"
    | "array-count"
    | "scalar"
    | "n-dims"
    | "ne"
    | "tensor-type"
    | "tensor-offset";
}

const SCALAR_WIDTH = [1, 1, 2, 2, 4, 4, 4, 1, -1, -1, 8, 8, 8];

/** Walks a valid GGUF file and lists its header fields (metadata values by their scalars). */
export function scanGgufFields(bytes: Uint8Array): GgufField[] {
  if (bytes.length < 24) throw new RangeError("scanGgufFields: not a GGUF file");
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const fields: GgufField[] = [];
  let p = 4;
  const u32 = (kind: GgufField["kind"]) => {
    fields.push({ at: p, width: 4, kind });
    const x = v.getUint32(p, true);
    p += 4;
    return x;
  };
  const u64 = (kind: GgufField["kind"]) => {
    fields.push({ at: p, width: 8, kind });
    const x = Number(v.getBigUint64(p, true));
    p += 8;
    return x;
  };
  const str = () => {
    const length = u64("string-length"); // not `p += u64(…)`: that would add to the old p
    p += length;
  };
  const value = (type: number): void => {
    if (type === T.str) return str();
    if (type === T.arr) {
      const item = u32("array-item-type");
      const n = u64("array-count");
      for (let i = 0; i < n; i++) value(item);
      return;
    }
    const w = SCALAR_WIDTH[type]!;
    if (w === 4 || w === 8) fields.push({ at: p, width: w, kind: "scalar" });
    p += w;
  };
  u32("version");
  const tensors = u64("tensor-count");
  const kvs = u64("kv-count");
  for (let i = 0; i < kvs; i++) {
    str();
    value(u32("value-type"));
  }
  for (let i = 0; i < tensors; i++) {
    str();
    const dims = u32("n-dims");
    for (let d = 0; d < dims; d++) u64("ne");
    u32("tensor-type");
    u64("tensor-offset");
  }
  return fields;
}
