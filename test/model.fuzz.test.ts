/**
 * Fuzzes the model header readers: valid safetensors and GGUF files, mutated — truncated at random
 * points, random bytes flipped, header fields (counts, lengths, types, dims, offsets, the
 * safetensors length and JSON fields) rewritten with boundary values, bytes inserted and deleted —
 * over 10,000 deterministic cases. Each must end in a valid parse or a ModelFormatError: never
 * another exception, a hang, or a large allocation.
 */
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { genModel } from "../lib/model/genModel";
import type { GgufValue } from "../lib/model/gguf";
import { ggmlNbytes } from "../lib/model/ggmlTypes";
import { writeGguf } from "../lib/model/ggufWriter";
import { groupTensors } from "../lib/model/grouping";
import { checkDitModelTensors, readModelHeader, requireDitConfig } from "../lib/model/modelFile";
import { ModelFormatError } from "../lib/model/safetensors";
import { scanGgufFields, type GgufField } from "./model.gguf.helpers";
import { FIXTURES_DIR } from "./fixturesDir";

/** mulberry32: small, fast, deterministic. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

type Rand = ReturnType<typeof prng>;
const int = (r: Rand, n: number) => Math.floor(r() * n);
const pick = <T>(r: Rand, items: readonly T[]): T => items[int(r, items.length)]!;

/** Boundary values for a rewritten integer field of a file of `size` bytes. */
function interesting(r: Rand, original: bigint, size: number, width: 4 | 8): bigint {
  const max = width === 4 ? 0xffffffffn : 0xffffffffffffffffn;
  const candidates = [
    0n,
    1n,
    2n,
    3n,
    4n,
    5n,
    7n,
    8n,
    9n,
    12n,
    13n,
    16n,
    31n,
    32n,
    33n,
    64n,
    255n,
    256n,
    0x7fffffffn,
    0x80000000n,
    0xffffffffn,
    0x100000000n,
    2n ** 53n,
    2n ** 53n + 1n,
    2n ** 62n,
    2n ** 63n - 1n,
    2n ** 63n,
    max,
    BigInt(size),
    BigInt(size) + 1n,
    BigInt(size) - 1n,
    original + 1n,
    original - 1n,
    original * 2n,
    original + 32n,
    original ^ 0x80n,
    BigInt(int(r, 2 ** 31)),
    BigInt(int(r, 2 ** 31)) * BigInt(int(r, 2 ** 31)),
  ];
  return BigInt.asUintN(64, pick(r, candidates)) & max;
}

function writeField(bytes: Uint8Array, field: { at: number; width: 4 | 8 }, value: bigint): void {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (field.width === 4) view.setUint32(field.at, Number(value & 0xffffffffn), true);
  else view.setBigUint64(field.at, value, true);
}

function readField(bytes: Uint8Array, field: { at: number; width: 4 | 8 }): bigint {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return field.width === 4
    ? BigInt(view.getUint32(field.at, true))
    : view.getBigUint64(field.at, true);
}

/** A position biased towards the header, where the interesting bytes are. */
function position(r: Rand, length: number, headerEnd: number): number {
  return r() < 0.85 ? int(r, Math.min(headerEnd, length)) : int(r, length);
}

function truncate(r: Rand, bytes: Uint8Array, headerEnd: number): Uint8Array {
  return bytes.slice(0, position(r, bytes.length, headerEnd + 1));
}

function flip(r: Rand, bytes: Uint8Array, headerEnd: number): Uint8Array {
  const out = bytes.slice();
  for (let i = 1 + int(r, 4); i > 0; i--) {
    out[position(r, out.length, headerEnd)] ^= 1 + int(r, 255);
  }
  return out;
}

function splice(r: Rand, bytes: Uint8Array, headerEnd: number): Uint8Array {
  const at = position(r, bytes.length, headerEnd);
  if (r() < 0.5)
    return Uint8Array.from([...bytes.subarray(0, at), ...bytes.subarray(at + 1 + int(r, 8))]);
  const inserted = Array.from({ length: 1 + int(r, 8) }, () => int(r, 256));
  return Uint8Array.from([...bytes.subarray(0, at), ...inserted, ...bytes.subarray(at)]);
}

function mutateGguf(
  r: Rand,
  bytes: Uint8Array,
  fields: GgufField[],
  headerEnd: number,
): Uint8Array {
  const op = int(r, 10);
  if (op < 2) return truncate(r, bytes, headerEnd);
  if (op < 4) return flip(r, bytes, headerEnd);
  if (op < 5) return splice(r, bytes, headerEnd);
  // Rewrite one or two header fields (sometimes then truncate).
  const out = bytes.slice();
  for (let i = r() < 0.3 ? 2 : 1; i > 0; i--) {
    const field = pick(r, fields);
    writeField(out, field, interesting(r, readField(out, field), out.length, field.width));
  }
  return r() < 0.15 ? truncate(r, out, headerEnd) : out;
}

const DTYPES = ["F32", "F16", "BF16", "I8", "U8", "F64", "BOOL", "F8_E4M3", "Q8_0", "f32", "", 7];
const NUMBERS: unknown[] = [
  0,
  1,
  -1,
  2.5,
  2 ** 53,
  2 ** 60,
  1e308,
  -0,
  "3",
  null,
  [],
  31,
  32,
  1e-7,
];

function mutateSafetensorsJson(r: Rand, bytes: Uint8Array): Uint8Array {
  const n = Number(new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n))) as Record<
    string,
    Record<string, unknown>
  >;
  const names = Object.keys(header).filter((k) => k !== "__metadata__");
  const name = pick(r, names);
  const entry = header[name]!;
  switch (int(r, 8)) {
    case 0:
      entry.dtype = pick(r, DTYPES);
      break;
    case 1: {
      const shape = (entry.shape as unknown[]).slice();
      if (shape.length > 0 && r() < 0.7) shape[int(r, shape.length)] = pick(r, NUMBERS);
      else shape.push(pick(r, NUMBERS));
      entry.shape = shape;
      break;
    }
    case 2: {
      const offsets = (entry.data_offsets as unknown[]).slice();
      offsets[int(r, 2)] = r() < 0.5 ? pick(r, NUMBERS) : (offsets[0] as number) + int(r, 64) - 32;
      entry.data_offsets = offsets;
      break;
    }
    case 3:
      delete entry[pick(r, ["dtype", "shape", "data_offsets"])];
      break;
    case 4:
      header[name] = pick(r, [null, [], "x", 5, {}]) as never;
      break;
    case 5:
      header["__metadata__"] = pick(r, [{ a: 1 }, [], "m", null, { k: "v" }]) as never;
      break;
    case 6: {
      // Another tensor's offsets: overlap or duplicate.
      const other = header[pick(r, names)]!;
      entry.data_offsets = other.data_offsets;
      break;
    }
    default:
      header[`extra${int(r, 3)}`] = {
        dtype: "F32",
        shape: [int(r, 4)],
        data_offsets: [0, 4 * int(r, 4)],
      };
  }
  const json = new TextEncoder().encode(JSON.stringify(header));
  const out = new Uint8Array(8 + json.length + (bytes.length - 8 - n));
  // Usually the right length; sometimes a wrong one.
  const length =
    r() < 0.85 ? BigInt(json.length) : interesting(r, BigInt(json.length), out.length, 8);
  new DataView(out.buffer).setBigUint64(0, length, true);
  out.set(json, 8);
  out.set(bytes.subarray(8 + n), 8 + json.length);
  return out;
}

function mutateSafetensors(r: Rand, bytes: Uint8Array): Uint8Array {
  const n = Number(new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(0, true));
  const headerEnd = 8 + n;
  const op = int(r, 10);
  if (op < 2) return truncate(r, bytes, headerEnd);
  if (op < 4) return flip(r, bytes, headerEnd);
  if (op < 5) return splice(r, bytes, headerEnd);
  if (op < 6) {
    const out = bytes.slice();
    writeField(out, { at: 0, width: 8 }, interesting(r, BigInt(n), out.length, 8));
    return out;
  }
  if (op < 7) {
    // Swap one JSON character for a structural one.
    const out = bytes.slice();
    out[8 + int(r, n)] = pick(r, [...'{}[]",:0123456789e-. ']).charCodeAt(0);
    return out;
  }
  return mutateSafetensorsJson(r, bytes);
}

interface Seed {
  name: string;
  bytes: Uint8Array;
  format: "gguf" | "safetensors";
  fields: GgufField[];
  headerEnd: number;
}

let dir: string;
const seeds: Seed[] = [];

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "ferry-fuzz-test-"));
  const small = { blocks: 1, hidden: 32, heads: 2, channels: 32, seed: 1 };
  await genModel(join(dir, "q4.gguf"), { ...small, dtype: "q4_0" });
  await genModel(join(dir, "f16.gguf"), { ...small, channels: 16, dtype: "f16" });
  await genModel(join(dir, "dit.safetensors"), { ...small, dtype: "bf16" });
  // Every metadata type, nested arrays, several ggml types.
  const meta = new Map<string, GgufValue>([
    ["general.architecture", { type: "string", value: "fuzz" }],
    ["general.alignment", { type: "uint32", value: 64 }],
    ["b", { type: "bool", value: true }],
    ["i64", { type: "int64", value: -5n }],
    ["f64", { type: "float64", value: 1.5 }],
    ["tokens", { type: "array", value: { itemType: "string", items: ["<s>", "a", "bc", ""] } }],
    ["scores", { type: "array", value: { itemType: "float32", items: Float32Array.of(1, 2, 3) } }],
    [
      "nested",
      {
        type: "array",
        value: {
          itemType: "array",
          items: [{ itemType: "uint16", items: Uint16Array.of(1, 2) }],
        },
      },
    ],
  ]);
  await writeGguf(
    join(dir, "meta.gguf"),
    meta,
    [
      { name: "token_embd.weight", type: "q8_0", ne: [32, 2], data: new Uint8Array(68) },
      { name: "blk.0.attn_q.weight", type: "q4_K", ne: [256], data: new Uint8Array(144) },
      { name: "blk.0.norm", type: "f32", ne: [3, 1, 1, 1], data: new Uint8Array(12) },
      { name: "output.weight", type: "bf16", ne: [2, 2], data: new Uint8Array(8) },
    ],
    { alignment: 64 },
  );
  for (const name of ["q4.gguf", "f16.gguf", "meta.gguf"]) {
    const bytes = new Uint8Array(await readFile(join(dir, name)));
    const fields = scanGgufFields(bytes);
    const last = fields[fields.length - 1]!;
    seeds.push({ name, bytes, format: "gguf", fields, headerEnd: last.at + last.width });
  }
  for (const path of [
    join(dir, "dit.safetensors"),
    join(FIXTURES_DIR, "safetensors-samples", "overall.safetensors"),
  ]) {
    const bytes = new Uint8Array(await readFile(path));
    const n = Number(new DataView(bytes.buffer).getBigUint64(0, true));
    seeds.push({ name: path, bytes, format: "safetensors", fields: [], headerEnd: 8 + n });
  }
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/**
 * Runs the readers on `path`: "ok" when the header parses (then the DiT checks run too, and may
 * only fail with a ModelFormatError), "error" for a ModelFormatError; anything else throws.
 */
async function exercise(path: string, size: number): Promise<"ok" | "error"> {
  let header;
  try {
    header = await readModelHeader(path);
  } catch (err) {
    if (err instanceof ModelFormatError) return "error";
    throw err;
  }
  // A successful parse must describe a sane file.
  let last = header.dataStart;
  for (const t of header.tensors) {
    if (!(t.begin >= header.dataStart && t.end >= t.begin && t.end <= size)) {
      throw new Error(`tensor ${t.name} [${t.begin}, ${t.end}) outside the ${size}-byte file`);
    }
    if (t.bytes > 0 && t.begin < last) throw new Error(`tensor ${t.name} overlaps`);
    if (t.bytes > 0) last = t.end;
  }
  if (header.format === "gguf") {
    for (const t of header.gguf.tensors) {
      // Throws (and fails the case) for a shape a valid parse must never have let through.
      if (ggmlNbytes(t.type, t.ne) !== t.bytes) throw new Error(`tensor ${t.name}: wrong size`);
      if (t.offset % header.gguf.alignment !== 0) throw new Error(`tensor ${t.name}: misaligned`);
    }
  }
  groupTensors(header.tensors);
  try {
    checkDitModelTensors(header, requireDitConfig(header));
  } catch (err) {
    if (!(err instanceof ModelFormatError)) throw err;
  }
  return "ok";
}

const CASES_PER_SEED = [2600, 2000, 2600, 1800, 1000]; // 10,000 in all

describe("model header readers under fuzzing", () => {
  it("end every mutated file in a valid parse or a ModelFormatError", async () => {
    expect(seeds).toHaveLength(CASES_PER_SEED.length);
    const path = join(dir, "case.bin");
    const outcomes = { ok: 0, error: 0 };
    let cases = 0;
    let slowest = 0;
    for (const [s, seed] of seeds.entries()) {
      // Every seed parses cleanly as written.
      await writeFile(path, seed.bytes);
      expect(await exercise(path, seed.bytes.length)).toBe("ok");
      const r = prng(0xfe22 + s);
      for (let i = 0; i < CASES_PER_SEED[s]!; i++) {
        const mutated =
          seed.format === "gguf"
            ? mutateGguf(r, seed.bytes, seed.fields, seed.headerEnd)
            : mutateSafetensors(r, seed.bytes);
        await writeFile(path, mutated);
        const t0 = Date.now();
        let outcome: "ok" | "error";
        try {
          outcome = await exercise(path, mutated.length);
        } catch (err) {
          const hex = Buffer.from(mutated.subarray(0, 96)).toString("hex");
          throw new Error(
            `${seed.name} case ${i}: ${(err as Error).name}: ${(err as Error).message}\nfirst bytes: ${hex}`,
            { cause: err },
          );
        }
        slowest = Math.max(slowest, Date.now() - t0);
        outcomes[outcome]++;
        cases++;
        if (i % 500 === 0) {
          // Bounded reads: nothing near the size of a claimed length is ever allocated.
          expect(process.memoryUsage().arrayBuffers).toBeLessThan(512 << 20);
        }
      }
    }
    if (process.env.FUZZ_STATS) console.log(outcomes, `slowest ${slowest} ms`);
    expect(cases).toBe(10_000);
    // Both outcomes occur: the mutations are neither all harmless nor all fatal.
    expect(outcomes.error).toBeGreaterThan(5000);
    expect(outcomes.ok).toBeGreaterThan(100);
    expect(slowest).toBeLessThan(1000);
    // No bound on the total: it measured the machine (36 s alone, 57–88 s beside the other
    // test worker while other builds ran); the test's own timeout still catches a hang.
  }, 120_000);
});
