import { mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { bf16ToF32, f16ToF32, f32ToBf16, f32ToF16 } from "../lib/model/half";
import {
  decodeTensor,
  encodeSafetensorsHeader,
  ModelFormatError,
  readSafetensorsHeader,
  readTensor,
  SAFETENSORS_DTYPE_BYTES,
  writeSafetensors,
  type SafetensorsDtype,
} from "../lib/model/safetensors";
import { FIXTURES_DIR } from "./fixturesDir";

const FIXTURES = join(FIXTURES_DIR, "safetensors-samples");
const SIGNED = [-3, -2, -1, 0, 1, 2];

/** What each fixture letter holds: −3…2, unsigned types wrapped. */
const FIXTURE_VALUES: Record<string, { dtype: SafetensorsDtype; values: number[] }> = {
  B: { dtype: "U8", values: [253, 254, 255, 0, 1, 2] },
  H: { dtype: "U16", values: [65533, 65534, 65535, 0, 1, 2] },
  I: { dtype: "U32", values: [4294967293, 4294967294, 4294967295, 0, 1, 2] },
  b: { dtype: "I8", values: SIGNED },
  h: { dtype: "I16", values: SIGNED },
  i: { dtype: "I32", values: SIGNED },
  e: { dtype: "F16", values: SIGNED },
  f: { dtype: "F32", values: SIGNED },
  d: { dtype: "F64", values: SIGNED },
};

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "ferry-safetensors-test-"));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe("readSafetensorsHeader on the published samples", () => {
  for (const [letter, { dtype, values }] of Object.entries(FIXTURE_VALUES)) {
    it(`${letter}.safetensors: one ${dtype} tensor [6] = ${values.join(",")}`, async () => {
      const path = join(FIXTURES, `${letter}.safetensors`);
      const header = await readSafetensorsHeader(path);
      expect(header.metadata).toEqual({ test: "a" });
      expect(header.tensors).toHaveLength(1);
      const t = header.tensors[0]!;
      expect(t).toMatchObject({ name: letter, dtype, shape: [6], begin: header.dataStart });
      expect(t.bytes).toBe(6 * SAFETENSORS_DTYPE_BYTES[dtype]);
      expect(t.end).toBe(header.fileBytes);
      expect(header.dataStart).toBe(8 + header.headerBytes);
      expect(await readTensor(path, header, letter)).toEqual(values);
    });
  }

  it("overall.safetensors: every tensor, in data order, with absolute offsets", async () => {
    const path = join(FIXTURES, "overall.safetensors");
    const header = await readSafetensorsHeader(path);
    expect(header.headerBytes).toBe(0x20e);
    expect(header.dataStart).toBe(8 + 0x20e);
    expect(header.metadata).toEqual({ test: "a" });
    const names = header.tensors.map((t) => t.name);
    expect(new Set(names)).toEqual(new Set(Object.keys(FIXTURE_VALUES)));
    // Data order: offsets ascending and back to back.
    let at = header.dataStart;
    for (const t of header.tensors) {
      expect(t.begin).toBe(at);
      at = t.end;
    }
    expect(at).toBe(header.fileBytes);
    // "H" (U16) sits at relative offset 6 in the file: unaligned reads must work.
    expect(header.tensors.find((t) => t.name === "H")).toMatchObject({
      begin: header.dataStart + 6,
      end: header.dataStart + 18,
      bytes: 12,
    });
    for (const [letter, { dtype, values }] of Object.entries(FIXTURE_VALUES)) {
      expect(header.tensors.find((t) => t.name === letter)!.dtype).toBe(dtype);
      expect(await readTensor(path, header, letter)).toEqual(values);
    }
  });

  it("readTensor names a missing tensor", async () => {
    const path = join(FIXTURES, "f.safetensors");
    const header = await readSafetensorsHeader(path);
    await expect(readTensor(path, header, "nope")).rejects.toThrow(/no tensor named "nope"/);
  });
});

describe("decodeTensor", () => {
  it("decodes every dtype little-endian", () => {
    expect(decodeTensor("BOOL", Uint8Array.from([0, 1, 2]))).toEqual([0, 1, 1]);
    expect(decodeTensor("I64", Uint8Array.from([0xfd, 255, 255, 255, 255, 255, 255, 255]))).toEqual(
      [-3],
    );
    expect(decodeTensor("U64", Uint8Array.from([5, 0, 0, 0, 0, 0, 0, 1]))).toEqual([2 ** 56 + 5]);
    expect(decodeTensor("BF16", Uint8Array.from([0x40, 0xc0, 0x80, 0x3f]))).toEqual([-3, 1]);
    // e5m2: 0x3c = 1.0, 0xc0 = -2; e4m3: 0x38 = 1.0, 0x7e = 448, 0x7f = NaN, 0x01 = 2^-9
    expect(decodeTensor("F8_E5M2", Uint8Array.from([0x3c, 0xc0]))).toEqual([1, -2]);
    const e4 = decodeTensor("F8_E4M3", Uint8Array.from([0x38, 0x7e, 0x01, 0xb8, 0x7f]));
    expect(e4.slice(0, 4)).toEqual([1, 448, 2 ** -9, -1]);
    expect(Number.isNaN(e4[4])).toBe(true);
    expect(() => decodeTensor("F32", new Uint8Array(6))).toThrow(/whole number/);
  });
});

describe("writeSafetensors", () => {
  const values = [-3, -2, -1, 0, 1, 2, 0.1, 1e-5, 65519, -7.25];

  function bytesOf(dtype: "F32" | "F16" | "BF16" | "I32", xs: number[]): Uint8Array {
    const size = dtype === "F32" || dtype === "I32" ? 4 : 2;
    const out = new Uint8Array(xs.length * size);
    const view = new DataView(out.buffer);
    xs.forEach((x, i) => {
      if (dtype === "F32") view.setFloat32(i * 4, x, true);
      else if (dtype === "I32") view.setInt32(i * 4, x, true);
      else view.setUint16(i * 2, dtype === "F16" ? f32ToF16(x) : f32ToBf16(x), true);
    });
    return out;
  }

  it("round-trips metadata, shapes and values for each dtype (f16/bf16 rounded to nearest)", async () => {
    const path = join(dir, "roundtrip.safetensors");
    const result = await writeSafetensors(path, { "ferry.arch": "dit", note: "ünïcode ✓" }, [
      { name: "a.f32", dtype: "F32", shape: [2, 5], data: bytesOf("F32", values) },
      { name: "b.f16", dtype: "F16", shape: [10], data: () => bytesOf("F16", values) },
      // Chunked: a generator of pieces, like gen-model.
      {
        name: "c.bf16",
        dtype: "BF16",
        shape: [5, 2],
        data: function* () {
          const all = bytesOf("BF16", values);
          yield all.subarray(0, 3); // a chunk boundary inside an element is fine
          yield all.subarray(3);
        },
      },
      {
        name: "d.i32",
        dtype: "I32",
        shape: [3],
        data: async () => bytesOf("I32", [-1, 7, 2 ** 31 - 1]),
      },
      { name: "e.empty", dtype: "F32", shape: [0, 4], data: new Uint8Array(0) },
    ]);
    const header = await readSafetensorsHeader(path);
    expect(result.bytes).toBe(header.fileBytes);
    expect(header.dataStart % 8).toBe(0); // header padded so data is 8-aligned
    expect(header.metadata).toEqual({ "ferry.arch": "dit", note: "ünïcode ✓" });
    expect(header.tensors.map((t) => [t.name, t.dtype, t.shape])).toEqual([
      ["a.f32", "F32", [2, 5]],
      ["b.f16", "F16", [10]],
      ["c.bf16", "BF16", [5, 2]],
      ["d.i32", "I32", [3]],
      ["e.empty", "F32", [0, 4]],
    ]);
    expect(await readTensor(path, header, "a.f32")).toEqual(values.map(Math.fround));
    const f16 = await readTensor(path, header, "b.f16");
    expect(f16).toEqual(values.map((v) => f16ToF32(f32ToF16(v))));
    expect(f16[6]).toBe(0.0999755859375); // 0.1 → nearest half
    expect(f16[8]).toBe(65504); // 65519 rounds down, not to ∞
    const bf = await readTensor(path, header, "c.bf16");
    expect(bf).toEqual(values.map((v) => bf16ToF32(f32ToBf16(v))));
    expect(bf[6]).toBe(0.10009765625);
    expect(await readTensor(path, header, "d.i32")).toEqual([-1, 7, 2 ** 31 - 1]);
    expect(await readTensor(path, header, "e.empty")).toEqual([]);
    expect((await readdir(dir)).filter((f) => f.endsWith(".tmp"))).toEqual([]);
  });

  it("leaves nothing behind when a tensor's data has the wrong size", async () => {
    const path = join(dir, "bad-size.safetensors");
    await expect(
      writeSafetensors(path, {}, [
        { name: "ok", dtype: "F32", shape: [2], data: new Uint8Array(8) },
        { name: "short", dtype: "F32", shape: [3], data: () => new Uint8Array(8) },
      ]),
    ).rejects.toThrow(/tensor "short": data has 8 bytes, but F32 \[3\] needs 12/);
    await expect(
      writeSafetensors(path, {}, [
        {
          name: "long",
          dtype: "F16",
          shape: [1],
          data: () => [new Uint8Array(2), new Uint8Array(1)],
        },
      ]),
    ).rejects.toThrow(/tensor "long": data has more than 2 bytes, but F16 \[1\] needs 2/);
    const files = await readdir(dir);
    expect(files).not.toContain("bad-size.safetensors");
    expect(files).not.toContain("bad-size.safetensors.tmp");
  });

  it("leaves a previous file intact when a producer throws mid-write", async () => {
    const path = join(dir, "keep.safetensors");
    await writeSafetensors(path, {}, [
      { name: "x", dtype: "U8", shape: [1], data: Uint8Array.of(9) },
    ]);
    const before = await readFile(path);
    await expect(
      writeSafetensors(path, {}, [
        {
          name: "x",
          dtype: "U8",
          shape: [4],
          data: function* () {
            yield Uint8Array.of(1, 2);
            throw new Error("generator failed");
          },
        },
      ]),
    ).rejects.toThrow("generator failed");
    expect(await readFile(path)).toEqual(before);
    expect(await readdir(dir)).not.toContain("keep.safetensors.tmp");
  });

  it("refuses duplicate and reserved names", () => {
    expect(() =>
      encodeSafetensorsHeader({}, [
        { name: "a", dtype: "F32", shape: [1] },
        { name: "a", dtype: "F32", shape: [1] },
      ]),
    ).toThrow(/duplicate tensor name "a"/);
    expect(() =>
      encodeSafetensorsHeader({}, [{ name: "__metadata__", dtype: "F32", shape: [1] }]),
    ).toThrow(/invalid tensor name/);
  });
});

describe("readSafetensorsHeader rejects corrupt files with a helpful ModelFormatError", () => {
  /** A file with header text `json` and `data` bytes; `length` overrides the length field. */
  async function craft(
    name: string,
    json: string,
    dataBytes = 0,
    length?: bigint,
  ): Promise<string> {
    const text = new TextEncoder().encode(json);
    const buf = new Uint8Array(8 + text.length + dataBytes);
    new DataView(buf.buffer).setBigUint64(0, length ?? BigInt(text.length), true);
    buf.set(text, 8);
    const path = join(dir, name);
    await writeFile(path, buf);
    return path;
  }

  async function expectFormatError(path: string, pattern: RegExp): Promise<void> {
    const err = await readSafetensorsHeader(path).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(ModelFormatError);
    expect((err as Error).name).toBe("ModelFormatError");
    expect((err as Error).message).toContain(path);
    expect((err as Error).message).toMatch(pattern);
  }

  const tensor = (dtype: string, shape: unknown, offsets: unknown) =>
    JSON.stringify({ dtype, shape, data_offsets: offsets });

  it("a file shorter than the length field", async () => {
    const path = join(dir, "tiny.safetensors");
    await writeFile(path, Uint8Array.of(1, 2, 3));
    await expectFormatError(path, /too short.*3 bytes/);
  });

  it("a truncated copy of a real sample", async () => {
    const full = await readFile(join(FIXTURES, "overall.safetensors"));
    const path = join(dir, "truncated-header.safetensors");
    await writeFile(path, full.subarray(0, 100));
    await expectFormatError(path, /header length 526 runs past the end of the file \(100 bytes/);
    // Header intact, data cut: the last tensors' offsets now run past the end.
    const path2 = join(dir, "truncated-data.safetensors");
    await writeFile(path2, full.subarray(0, full.length - 10));
    await expectFormatError(
      path2,
      /tensor "[a-zA-Z]": data_offsets \[\d+, 168\] run past the end of the data \(158 bytes/,
    );
  });

  it("a header length over the 100 MB limit", async () => {
    const path = await craft("huge-length.safetensors", "{}", 0, 1n << 40n);
    await expectFormatError(path, /header length 1099511627776 exceeds the 100000000-byte limit/);
  });

  it("invalid JSON, non-object JSON, invalid UTF-8", async () => {
    await expectFormatError(await craft("badjson.safetensors", '{"a": {'), /not valid JSON/);
    await expectFormatError(
      await craft("array.safetensors", "[1,2]"),
      /must be a JSON object, got \[1,2\]/,
    );
    const path = join(dir, "utf8.safetensors");
    await writeFile(path, Uint8Array.of(2, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xfe));
    await expectFormatError(path, /not valid UTF-8/);
  });

  it("missing or ill-typed fields", async () => {
    await expectFormatError(
      await craft("nodtype.safetensors", `{"w": {"shape": [1], "data_offsets": [0, 4]}}`, 4),
      /tensor "w": missing or non-string "dtype"/,
    );
    await expectFormatError(
      await craft("badshape.safetensors", `{"w": ${tensor("F32", [1.5], [0, 4])}}`, 4),
      /tensor "w": "shape" must be an array of non-negative integers, got \[1.5\]/,
    );
    await expectFormatError(
      await craft("negshape.safetensors", `{"w": ${tensor("F32", [-1], [0, 4])}}`, 4),
      /tensor "w": "shape"/,
    );
    await expectFormatError(
      await craft("badoffsets.safetensors", `{"w": ${tensor("F32", [1], [0])}}`, 4),
      /tensor "w": "data_offsets" must be \[begin, end\]/,
    );
    await expectFormatError(
      await craft("badmeta.safetensors", `{"__metadata__": {"n": 3}}`),
      /__metadata__ value of "n" must be a string/,
    );
    await expectFormatError(
      await craft("entry.safetensors", `{"w": 3}`),
      /tensor "w": entry must be an object/,
    );
  });

  it("an unknown dtype, listing the known ones", async () => {
    await expectFormatError(
      await craft("dtype.safetensors", `{"w": ${tensor("Q4_0", [2], [0, 4])}}`, 4),
      /tensor "w": unknown dtype "Q4_0" \(known: BOOL, U8, .*BF16.*U64\)/,
    );
  });

  it("offsets past the end, reversed, or overlapping", async () => {
    await expectFormatError(
      await craft("past.safetensors", `{"w": ${tensor("F32", [2], [0, 8])}}`, 4),
      /tensor "w": data_offsets \[0, 8\] run past the end of the data \(4 bytes/,
    );
    await expectFormatError(
      await craft("reversed.safetensors", `{"w": ${tensor("F32", [1], [4, 0])}}`, 4),
      /tensor "w": data_offsets \[4, 0\] begin after end/,
    );
    await expectFormatError(
      await craft(
        "overlap.safetensors",
        `{"a": ${tensor("F32", [2], [0, 8])}, "b": ${tensor("F32", [2], [4, 12])}}`,
        12,
      ),
      /tensor "b" data_offsets \[4, 12\] overlap tensor "a" \[0, 8\]/,
    );
  });

  it("a byte size that does not match the shape", async () => {
    await expectFormatError(
      await craft("size.safetensors", `{"w": ${tensor("F32", [2, 3], [0, 12])}}`, 12),
      /tensor "w": data_offsets \[0, 12\] hold 12 bytes, but F32 shape \[2, 3\] needs 24/,
    );
    // A shape whose byte size overflows 2^53 is still compared exactly.
    await expectFormatError(
      await craft("overflow.safetensors", `{"w": ${tensor("U8", [2 ** 40, 2 ** 40], [0, 0])}}`),
      /needs 1208925819614629174706176/,
    );
  });

  it("accepts an empty header and padding spaces", async () => {
    const header = await readSafetensorsHeader(await craft("empty.safetensors", "{}       "));
    expect(header.tensors).toEqual([]);
    expect(header.metadata).toEqual({});
  });
});
