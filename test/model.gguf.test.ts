import { mkdtemp, open, readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  findGgufTensor,
  ggufValueToJson,
  readGgufHeader,
  shortestFloat32,
  summarizeGgufValue,
  type GgufValue,
} from "../lib/model/gguf";
import { encodeGgufHeader, writeGguf } from "../lib/model/ggufWriter";
import { ModelFormatError } from "../lib/model/safetensors";
import { Bytes, T, tinyGguf } from "./model.gguf.helpers";
import { FIXTURES_DIR } from "./fixturesDir";

const LLAMA = join(FIXTURES_DIR, "gguf", "llama-2-tiny-random.gguf");

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "ferry-gguf-test-"));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

let fileNo = 0;
async function file(bytes: Uint8Array): Promise<string> {
  const path = join(dir, `f${fileNo++}.gguf`);
  await writeFile(path, bytes);
  return path;
}

/** The ModelFormatError message reading `bytes` produces. */
async function errorOf(bytes: Uint8Array, options = {}): Promise<string> {
  const path = await file(bytes);
  const err = await readGgufHeader(path, options).then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(ModelFormatError);
  const message = (err as Error).message;
  expect(message.startsWith(`${path}: `)).toBe(true);
  return message.slice(path.length + 2);
}

describe("readGgufHeader on the real tiny Llama file", () => {
  it("reads version, alignment, the 18 metadata keys and their typed values", async () => {
    const h = await readGgufHeader(LLAMA);
    expect(h.version).toBe(3);
    expect(h.alignment).toBe(32);
    expect(h.fileBytes).toBe(1_750_560);
    expect(h.metadata.size).toBe(18);
    expect(h.metadata.get("general.architecture")).toEqual({ type: "string", value: "llama" });
    expect(h.metadata.get("general.name")).toEqual({ type: "string", value: "LLaMA v2" });
    expect(h.metadata.get("llama.embedding_length")).toEqual({ type: "uint32", value: 8 });
    expect(h.metadata.get("llama.block_count")).toEqual({ type: "uint32", value: 1 });
    expect(h.metadata.get("llama.feed_forward_length")).toEqual({ type: "uint32", value: 32 });
    expect(h.metadata.get("llama.context_length")).toEqual({ type: "uint32", value: 4096 });
    const eps = h.metadata.get("llama.attention.layer_norm_rms_epsilon")!;
    expect(eps.type).toBe("float32");
    expect(eps.value).toBe(Math.fround(1e-5));
    expect(ggufValueToJson(eps)).toBe(1e-5);

    const tokens = h.metadata.get("tokenizer.ggml.tokens")!;
    if (tokens.type !== "array") throw new Error("tokens is not an array");
    expect(tokens.value.itemType).toBe("string");
    expect(tokens.value.items.length).toBe(32_000);
    expect((tokens.value.items as string[]).slice(0, 4)).toEqual([
      "<unk>",
      "<s>",
      "</s>",
      "<0x00>",
    ]);
    const scores = h.metadata.get("tokenizer.ggml.scores")!;
    if (scores.type !== "array") throw new Error("scores is not an array");
    expect(scores.value.itemType).toBe("float32");
    expect(scores.value.items).toBeInstanceOf(Float32Array);
    expect(scores.value.items.length).toBe(32_000);
    const types = h.metadata.get("tokenizer.ggml.token_type")!;
    if (types.type !== "array") throw new Error("token_type is not an array");
    expect(types.value.items).toBeInstanceOf(Int32Array);
    expect(Array.from(types.value.items as Int32Array).slice(0, 4)).toEqual([2, 3, 3, 6]);
    expect(summarizeGgufValue(tokens)).toBe('[string × 32000] "<unk>", "<s>", "</s>", "<0x00>", …');
  });

  it("reads the 12 tensors with their types, ne, shapes and byte ranges", async () => {
    const h = await readGgufHeader(LLAMA);
    const rows = h.tensors.map((t) => [t.name, t.type, t.ne, t.bytes]);
    expect(rows).toEqual([
      ["token_embd.weight", "f16", [8, 32000], 512_000],
      ["blk.0.attn_q.weight", "f16", [8, 8], 128],
      ["blk.0.attn_k.weight", "f16", [8, 8], 128],
      ["blk.0.attn_v.weight", "f16", [8, 8], 128],
      ["blk.0.attn_output.weight", "f16", [8, 8], 128],
      ["blk.0.ffn_gate.weight", "f16", [8, 32], 512],
      ["blk.0.ffn_up.weight", "f16", [8, 32], 512],
      ["blk.0.ffn_down.weight", "f16", [32, 8], 512],
      ["blk.0.attn_norm.weight", "f32", [8], 32],
      ["blk.0.ffn_norm.weight", "f32", [8], 32],
      ["output_norm.weight", "f32", [8], 32],
      ["output.weight", "f16", [8, 32000], 512_000],
    ]);
    expect(findGgufTensor(h, "token_embd.weight").shape).toEqual([32000, 8]);
    // The data section starts at the aligned end of the tensor infos; tensors follow back to back
    // (every size here is a multiple of 32) and the last one ends exactly at the end of the file.
    expect(h.dataStart % 32).toBe(0);
    expect(h.dataStart - h.headerBytes).toBeLessThan(32);
    expect(h.dataStart).toBe(724_416);
    let at = h.dataStart;
    for (const t of h.tensors) {
      expect(t.begin).toBe(at);
      expect(t.end).toBe(t.begin + t.bytes);
      expect(t.offset).toBe(t.begin - h.dataStart);
      at = t.end;
    }
    expect(at).toBe(h.fileBytes);
    expect(() => findGgufTensor(h, "nope")).toThrow(/no tensor named "nope"/);
  });

  it("reads the tensor data where the header says (token_embd f16 values are finite)", async () => {
    const h = await readGgufHeader(LLAMA);
    const t = findGgufTensor(h, "blk.0.attn_norm.weight");
    const fh = await open(LLAMA, "r");
    try {
      const buf = new Uint8Array(t.bytes);
      await fh.read(buf, 0, t.bytes, t.begin);
      const values = new Float32Array(buf.buffer);
      expect(values.every((v) => Number.isFinite(v))).toBe(true);
    } finally {
      await fh.close();
    }
  });
});

describe("readGgufHeader reads only the header", () => {
  it("inspects a 2 GiB (sparse) file in a moment, without reading its data", async () => {
    const path = join(dir, "huge.gguf");
    const ne = [1 << 16, 1 << 15]; // 2^31 q8_0 elements: 2^31/32·34 bytes of (unwritten) data
    const { header, dataBytes } = encodeGgufHeader(
      new Map<string, GgufValue>([["general.name", { type: "string", value: "huge" }]]),
      [{ name: "w", type: "q8_0", ne }],
    );
    const fh = await open(path, "w");
    await fh.write(header, 0, header.length, 0);
    await fh.truncate(header.length + dataBytes);
    await fh.close();
    expect((await stat(path)).size).toBeGreaterThan(2 ** 31);
    const started = Date.now();
    const h = await readGgufHeader(path);
    expect(Date.now() - started).toBeLessThan(2000);
    expect(h.tensors[0]!.bytes).toBe((2 ** 31 / 32) * 34);
    await rm(path);
  });

  it("refuses a header over maxHeaderBytes", async () => {
    const bytes = tinyGguf({
      kvCount: 1,
      kvs: (b) => b.str("k").u32(T.str).str("x".repeat(5000)),
    });
    expect(await errorOf(bytes, { maxHeaderBytes: 4096 })).toMatch(
      /header is larger than the 4096-byte limit \(reading value of "k"/,
    );
    await expect(readGgufHeader(await file(bytes))).resolves.toBeDefined();
  });
});

describe("GGUF writer ↔ reader", () => {
  const metadata = new Map<string, GgufValue>([
    ["general.architecture", { type: "string", value: "test-ärch ✓" }],
    ["u8", { type: "uint8", value: 255 }],
    ["i8", { type: "int8", value: -128 }],
    ["u16", { type: "uint16", value: 65535 }],
    ["i16", { type: "int16", value: -32768 }],
    ["u32", { type: "uint32", value: 4294967295 }],
    ["i32", { type: "int32", value: -2147483648 }],
    ["f32", { type: "float32", value: Math.fround(0.1) }],
    ["f64", { type: "float64", value: 0.1 }],
    ["bool", { type: "bool", value: true }],
    ["u64", { type: "uint64", value: 2n ** 64n - 1n }],
    ["i64", { type: "int64", value: -(2n ** 63n) }],
    ["empty", { type: "string", value: "" }],
    ["strings", { type: "array", value: { itemType: "string", items: ["a", "", "ü"] } }],
    [
      "floats",
      { type: "array", value: { itemType: "float32", items: Float32Array.from([1.5, -2]) } },
    ],
    ["bools", { type: "array", value: { itemType: "bool", items: [true, false] } }],
    [
      "big",
      { type: "array", value: { itemType: "uint64", items: BigUint64Array.from([0n, 2n ** 63n]) } },
    ],
    [
      "nested",
      {
        type: "array",
        value: {
          itemType: "array",
          items: [
            { itemType: "int16", items: Int16Array.from([1, -1]) },
            { itemType: "array", items: [{ itemType: "string", items: ["deep"] }] },
          ],
        },
      },
    ],
  ]);

  it("round-trips every value type, nested arrays and tensors of several ggml types", async () => {
    const path = join(dir, "all.gguf");
    const tensors = [
      { name: "a", type: "f32", ne: [3], data: new Uint8Array(12).fill(1) },
      { name: "b", type: "q4_K", ne: [256, 2], data: new Uint8Array(288).fill(2) },
      { name: "c.weight", type: "Q8_0", ne: [32, 1, 1, 2], data: new Uint8Array(68).fill(3) },
      { name: "empty", type: "f16", ne: [0, 4], data: new Uint8Array(0) },
    ];
    const written = await writeGguf(path, metadata, tensors);
    const h = await readGgufHeader(path);
    expect(h.version).toBe(3);
    expect(h.metadata).toEqual(metadata);
    expect(h.tensors.map((t) => [t.name, t.type, t.ne, t.offset, t.bytes])).toEqual([
      ["a", "f32", [3], 0, 12],
      ["b", "q4_K", [256, 2], 32, 288],
      ["c.weight", "q8_0", [32, 1, 1, 2], 320, 68],
      ["empty", "f16", [0, 4], 416, 0],
    ]);
    expect(h.dataStart).toBe(written.dataStart);
    expect(written.bytes).toBe(h.fileBytes);
    expect(h.fileBytes % 32).toBe(0);
    const bytes = await readFile(path);
    expect(bytes[h.tensors[1]!.begin]).toBe(2);
    expect(bytes[h.tensors[2]!.end - 1]).toBe(3);
    expect(bytes[h.tensors[0]!.end]).toBe(0); // padding
    expect(ggufValueToJson(metadata.get("u64")!)).toBe("18446744073709551615");
    expect(ggufValueToJson(metadata.get("nested")!)).toEqual([[1, -1], [["deep"]]]);
    expect(ggufValueToJson(metadata.get("f32")!)).toBe(0.1);
  });

  it("writes general.alignment for a non-default alignment and aligns to it", async () => {
    const path = join(dir, "align.gguf");
    await writeGguf(
      path,
      new Map(),
      [
        { name: "x", type: "f32", ne: [5], data: new Uint8Array(20) },
        { name: "y", type: "f32", ne: [5], data: new Uint8Array(20) },
      ],
      { alignment: 256 },
    );
    const h = await readGgufHeader(path);
    expect(h.metadata.get("general.alignment")).toEqual({ type: "uint32", value: 256 });
    expect(h.alignment).toBe(256);
    expect(h.dataStart % 256).toBe(0);
    expect(h.tensors[1]!.offset).toBe(256);
  });

  it("streams chunks and reports progress", async () => {
    const path = join(dir, "chunks.gguf");
    const seen: number[] = [];
    await writeGguf(
      path,
      {},
      [{ name: "x", type: "f32", ne: [6], data: () => [new Uint8Array(8), new Uint8Array(16)] }],
      { onProgress: (w) => seen.push(w) },
    );
    expect(seen).toEqual([8, 24, 32]);
    expect((await readGgufHeader(path)).tensors[0]!.bytes).toBe(24);
  });

  it("writes nothing when a tensor's data has the wrong size, or a value is invalid", async () => {
    const path = join(dir, "bad.gguf");
    await expect(
      writeGguf(path, {}, [{ name: "x", type: "q8_0", ne: [32], data: new Uint8Array(35) }]),
    ).rejects.toThrow(`tensor "x": data has more than 34 bytes, but q8_0 ne [32] needs 34`);
    await expect(
      writeGguf(path, {}, [
        { name: "x", type: "q8_0", ne: [32], data: () => [new Uint8Array(33)] },
      ]),
    ).rejects.toThrow(`tensor "x": data has 33 bytes, but q8_0 ne [32] needs 34`);
    await expect(
      writeGguf(path, {}, [{ name: "x", type: "q8_0", ne: [30], data: new Uint8Array(34) }]),
    ).rejects.toThrow(/not a multiple of the block size 32/);
    await expect(writeGguf(path, { k: { type: "uint8", value: 256 } }, [])).rejects.toThrow(
      `GGUF metadata "k": 256 is not a uint8`,
    );
    await expect(writeGguf(path, { k: { type: "uint64", value: -1n } }, [])).rejects.toThrow(
      /-1 is not a uint64/,
    );
    await expect(
      writeGguf(path, {}, [
        { name: "x", type: "f32", ne: [1], data: new Uint8Array(4) },
        { name: "x", type: "f32", ne: [1], data: new Uint8Array(4) },
      ]),
    ).rejects.toThrow(`duplicate tensor name "x"`);
    await expect(writeGguf(path, {}, [], { alignment: 48 })).rejects.toThrow(/power of two/);
    expect((await readdir(dir)).filter((f) => f.startsWith("bad"))).toEqual([]);
  });
});

describe("readGgufHeader rejects bad files with a ModelFormatError naming the problem", () => {
  const f32Tensor = (name: string, offset: number, ne = [8]) => ({ name, ne, type: 0, offset });

  it("wrong magic, too short, v1, big-endian, unknown versions", async () => {
    expect(await errorOf(new Uint8Array([0x47, 0x47]))).toMatch(/too short to be GGUF \(2 bytes/);
    const notGguf = tinyGguf();
    notGguf[3] = 0x47;
    expect(await errorOf(notGguf)).toBe(
      'not a GGUF file: it does not start with "GGUF" (47 47 55 46)',
    );
    expect(await errorOf(tinyGguf({ version: 1 }))).toMatch(/GGUF version 1 is not supported/);
    expect(await errorOf(tinyGguf({ version: 0x03000000 }))).toMatch(
      /unsupported GGUF version 50331648 \(a big-endian GGUF file/,
    );
    expect(await errorOf(tinyGguf({ version: 4 }))).toBe(
      "unsupported GGUF version 4; supported: 2, 3",
    );
    // v2 has the same layout.
    await expect(readGgufHeader(await file(tinyGguf({ version: 2 })))).resolves.toMatchObject({
      version: 2,
    });
  });

  it("truncation anywhere in the header", async () => {
    const full = tinyGguf({ kvCount: 1, kvs: (b) => b.str("general.name").u32(T.str).str("n") });
    expect(await errorOf(full.subarray(0, 6))).toMatch(
      /^truncated: version at byte 4 needs 4 bytes/,
    );
    expect(await errorOf(full.subarray(0, 30))).toMatch(/cannot fit in the 30-byte file/);
    // Cut inside the tensor info (after the metadata) — the counts still fit, the fields do not.
    const cut = full.subarray(0, 24 + 8 + 12 + 4 + 8 + 1 + 8 + 1 + 4 + 4);
    expect(await errorOf(cut)).toMatch(
      /truncated: ne\[0\] of tensor "w" at byte \d+ needs 8 bytes/,
    );
    // The data itself cut short.
    expect(await errorOf(full.subarray(0, full.length - 1))).toMatch(
      /tensor "w" \(f32 \[8\], 32 bytes\) at data offset 0 ends at byte \d+, past the end of the \d+-byte file; truncated\?/,
    );
  });

  it("absurd counts and lengths, before allocating anything", async () => {
    expect(await errorOf(tinyGguf({ tensorCount: 2 ** 40 }))).toMatch(
      /tensor count 1099511627776 is absurd \(limit 1000000\)/,
    );
    expect(await errorOf(tinyGguf({ kvCount: 2 ** 62 }))).toMatch(
      /4611686018427387904 metadata entries and 1 tensor infos cannot fit/,
    );
    const longKey = tinyGguf({ kvCount: 1, kvs: (b) => b.u64(2n ** 63n) });
    expect(await errorOf(longKey)).toMatch(
      /key of metadata entry #0 at byte 24 claims 9223372036854775808 bytes, over the 1073741824-byte limit/,
    );
    const pastEnd = tinyGguf({ kvCount: 1, kvs: (b) => b.u64(5000) });
    expect(await errorOf(pastEnd)).toMatch(
      /truncated: key of metadata entry #0 at byte 24 claims 5000 bytes, but only \d+ remain/,
    );
    const hugeArray = tinyGguf({
      kvCount: 1,
      kvs: (b) =>
        b
          .str("a")
          .u32(T.arr)
          .u32(T.u64)
          .u64(2n ** 61n),
    });
    expect(await errorOf(hugeArray)).toMatch(
      /value of "a": array of 2305843009213693952 uint64 items at byte \d+ cannot fit in the \d+ bytes left/,
    );
  });

  it("unknown value types, bad UTF-8, duplicate keys, deep nesting", async () => {
    expect(await errorOf(tinyGguf({ kvCount: 1, kvs: (b) => b.str("k").u32(13).u8(0) }))).toMatch(
      /metadata "k" has unknown value type 13 at byte 33/,
    );
    expect(
      await errorOf(tinyGguf({ kvCount: 1, kvs: (b) => b.str("k").u32(T.arr).u32(99).u64(0) })),
    ).toMatch(/value of "k" has unknown item type 99/);
    expect(
      await errorOf(
        tinyGguf({ kvCount: 1, kvs: (b) => b.u64(2).raw([0xc3, 0x28]).u32(T.u8).u8(0) }),
      ),
    ).toMatch(/key of metadata entry #0 at byte 32 is not valid UTF-8/);
    expect(
      await errorOf(
        tinyGguf({
          kvCount: 2,
          kvs: (b) => b.str("k").u32(T.u8).u8(1).str("k").u32(T.u8).u8(2),
        }),
      ),
    ).toBe('duplicate metadata key "k" (entry #1)');
    const deep = tinyGguf({
      kvCount: 1,
      kvs: (b) => {
        b.str("d");
        b.u32(T.arr);
        for (let i = 0; i < 9; i++) b.u32(T.arr).u64(1);
        b.u32(T.u8).u64(0);
      },
    });
    expect(await errorOf(deep)).toMatch(/arrays nested deeper than 8 levels/);
  });

  it("general.alignment of the wrong type or not a power of two", async () => {
    const align = (type: number, write: (b: Bytes) => void) =>
      tinyGguf({ kvCount: 1, kvs: (b) => write(b.str("general.alignment").u32(type)) });
    expect(await errorOf(align(T.u32, (b) => b.u32(48)))).toBe(
      '"general.alignment" must be a uint32 power of two, got uint32 48',
    );
    expect(await errorOf(align(T.u32, (b) => b.u32(0)))).toMatch(/got uint32 0/);
    expect(await errorOf(align(T.u64, (b) => b.u64(32)))).toMatch(/got uint64 32/);
    // A valid custom alignment moves the data start.
    const ok = tinyGguf({
      kvCount: 1,
      kvs: (b) => b.str("general.alignment").u32(T.u32).u32(64),
      alignment: 64,
    });
    const h = await readGgufHeader(await file(ok));
    expect(h.alignment).toBe(64);
    expect(h.dataStart % 64).toBe(0);
  });

  it("bad tensor infos: dims, types, shapes, names", async () => {
    const one = (t: { name: string; ne: number[]; type: number; offset: number }) =>
      tinyGguf({ tensors: [t], dataBytes: 64 });
    expect(await errorOf(one({ name: "t", ne: [], type: 0, offset: 0 }))).toBe(
      'tensor "t" has 0 dimensions; ggml allows 1 to 4',
    );
    expect(await errorOf(one({ name: "t", ne: [1, 1, 1, 1, 1], type: 0, offset: 0 }))).toBe(
      'tensor "t" has 5 dimensions; ggml allows 1 to 4',
    );
    expect(await errorOf(one({ name: "t", ne: [8], type: 4, offset: 0 }))).toBe(
      'tensor "t" has ggml type 4 (Q4_2), which ggml has removed; re-quantize the model',
    );
    expect(await errorOf(one({ name: "t", ne: [8], type: 77, offset: 0 }))).toBe(
      'tensor "t" has unknown ggml type 77',
    );
    expect(await errorOf(one({ name: "t", ne: [30], type: 8, offset: 0 }))).toBe(
      'tensor "t": ne[0] = 30 is not a multiple of the q8_0 block size 32 (shape [30], ggml order)',
    );
    expect(await errorOf(one({ name: "t", ne: [2 ** 53], type: 0, offset: 0 }))).toMatch(
      /tensor "t" has an absurd dimension ne\[0\] = 9007199254740992/,
    );
    expect(await errorOf(one({ name: "t", ne: [2 ** 40, 2 ** 40], type: 0, offset: 0 }))).toMatch(
      /shape \[1099511627776, 1099511627776\] \(ggml order\) overflows int64/,
    );
    expect(await errorOf(one({ name: "", ne: [8], type: 0, offset: 0 }))).toBe(
      "tensor #0 has an empty name",
    );
    expect(
      await errorOf(tinyGguf({ tensors: [f32Tensor("t", 0), f32Tensor("t", 32)], dataBytes: 64 })),
    ).toBe('duplicate tensor name "t" (tensor #1)');
  });

  it("data offsets: past the end, misaligned, overlapping", async () => {
    expect(await errorOf(tinyGguf({ tensors: [f32Tensor("t", 2 ** 50)] }))).toMatch(
      /tensor "t" \(f32 \[8\], 32 bytes at data offset 1125899906842624\) runs past the end/,
    );
    expect(await errorOf(tinyGguf({ tensors: [f32Tensor("t", 64)], dataBytes: 64 }))).toMatch(
      /tensor "t" .* ends at byte \d+, past the end/,
    );
    expect(await errorOf(tinyGguf({ tensors: [f32Tensor("t", 4)], dataBytes: 64 }))).toBe(
      'tensor "t" data offset 4 is not a multiple of the alignment 32',
    );
    expect(
      await errorOf(
        tinyGguf({ tensors: [f32Tensor("a", 0, [16]), f32Tensor("b", 32)], dataBytes: 96 }),
      ),
    ).toBe('tensor "b" data [32, 64) overlaps tensor "a" [0, 64)');
    // Touching is fine, and so are empty tensors anywhere.
    const ok = tinyGguf({
      tensors: [f32Tensor("a", 0), f32Tensor("b", 32), f32Tensor("e", 0, [0])],
      dataBytes: 64,
    });
    expect((await readGgufHeader(await file(ok))).tensors.map((t) => t.bytes)).toEqual([32, 32, 0]);
  });
});

describe("value helpers", () => {
  it("shortestFloat32 and summaries", () => {
    expect(shortestFloat32(Math.fround(1e-5))).toBe(1e-5);
    expect(shortestFloat32(Math.fround(0.1))).toBe(0.1);
    expect(shortestFloat32(Math.fround(16777217))).toBe(16777216);
    expect(summarizeGgufValue({ type: "string", value: "x".repeat(100) }, 10)).toBe(
      '"xxxxxxxxxx"…',
    );
    expect(summarizeGgufValue({ type: "uint64", value: 5n })).toBe("5");
    expect(summarizeGgufValue({ type: "array", value: { itemType: "string", items: [] } })).toBe(
      "[string × 0]",
    );
    expect(ggufValueToJson({ type: "float64", value: NaN })).toBe("NaN");
  });
});
