import { describe, expect, it } from "vitest";
import {
  GGML_REMOVED_TYPE_IDS,
  GGML_TYPES,
  ggmlNbytes,
  ggmlRowSize,
  ggmlType,
  ggmlTypeById,
  ggmlTypeByName,
} from "../lib/model/ggmlTypes";
import { ModelFormatError } from "../lib/model/safetensors";

// Written out independently of the table under test, from ggml's sources: ids from ggml.h's
// enum ggml_type, block sizes from ggml.c's type_traits (QK* constants), and type sizes from the
// static_asserts on the block structs in ggml-common.h (h = sizeof(ggml_half) = 2).
const h = 2;
const QK_K = 256;
const EXPECTED: [id: number, name: string, blockSize: number, typeSize: number][] = [
  [0, "f32", 1, 4],
  [1, "f16", 1, 2],
  [2, "q4_0", 32, h + 32 / 2],
  [3, "q4_1", 32, 2 * h + 32 / 2],
  [6, "q5_0", 32, h + 4 + 32 / 2],
  [7, "q5_1", 32, 2 * h + 4 + 32 / 2],
  [8, "q8_0", 32, h + 32],
  [9, "q8_1", 32, 2 * h + 32],
  [10, "q2_K", QK_K, 2 * h + QK_K / 16 + QK_K / 4],
  [11, "q3_K", QK_K, h + QK_K / 4 + QK_K / 8 + 12],
  [12, "q4_K", QK_K, 2 * h + 12 + QK_K / 2],
  [13, "q5_K", QK_K, 2 * h + 12 + QK_K / 2 + QK_K / 8],
  [14, "q6_K", QK_K, h + QK_K / 16 + (3 * QK_K) / 4],
  [15, "q8_K", QK_K, 4 + QK_K + (QK_K / 16) * 2],
  [16, "iq2_xxs", QK_K, h + (QK_K / 8) * 2],
  [17, "iq2_xs", QK_K, h + (QK_K / 8) * 2 + QK_K / 32],
  [18, "iq3_xxs", QK_K, h + 3 * (QK_K / 8)],
  [19, "iq1_s", QK_K, h + QK_K / 8 + QK_K / 16],
  [20, "iq4_nl", 32, h + 32 / 2],
  [21, "iq3_s", QK_K, h + 13 * (QK_K / 32) + QK_K / 64],
  [22, "iq2_s", QK_K, h + QK_K / 4 + QK_K / 16],
  [23, "iq4_xs", QK_K, h + 2 + QK_K / 64 + QK_K / 2],
  [24, "i8", 1, 1],
  [25, "i16", 1, 2],
  [26, "i32", 1, 4],
  [27, "i64", 1, 8],
  [28, "f64", 1, 8],
  [29, "iq1_m", QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32],
  [30, "bf16", 1, 2],
  [34, "tq1_0", QK_K, h + QK_K / 64 + (QK_K - (4 * QK_K) / 64) / 5],
  [35, "tq2_0", QK_K, h + QK_K / 4],
  [39, "mxfp4", 32, 1 + 32 / 2],
  [40, "nvfp4", 64, 64 / 16 + 64 / 2],
  [41, "q1_0", 128, h + 128 / 8],
  [42, "q2_0", 64, h + 64 / 4],
];

describe("ggml type traits", () => {
  it("has every ggml type with ggml's id, name, block size and type size", () => {
    expect(GGML_TYPES.map((t) => [t.id, t.name, t.blockSize, t.typeSize])).toEqual(EXPECTED);
  });

  it("spot-checks the well-known sizes (bits per weight)", () => {
    const bpw = (name: string) => (8 * ggmlType(name).typeSize) / ggmlType(name).blockSize;
    expect(bpw("q8_0")).toBe(8.5);
    expect(bpw("q4_0")).toBe(4.5);
    expect(bpw("q4_K")).toBe(4.5);
    expect(bpw("q5_K")).toBe(5.5);
    expect(bpw("q6_K")).toBe(6.5625);
    expect(bpw("q2_K")).toBe(2.625);
    expect(bpw("q3_K")).toBe(3.4375);
    expect(bpw("iq2_xxs")).toBe(2.0625);
    expect(bpw("tq1_0")).toBe(1.6875);
  });

  it("marks exactly the block types as quantized", () => {
    for (const t of GGML_TYPES) expect(t.quantized).toBe(t.blockSize > 1);
  });

  it("looks types up by id and by name, case-insensitively", () => {
    expect(ggmlTypeById(8)?.name).toBe("q8_0");
    expect(ggmlTypeByName("Q4_K")?.id).toBe(12);
    expect(ggmlTypeByName("q4_k")?.id).toBe(12);
    expect(ggmlTypeByName("BF16")?.id).toBe(30);
    expect(ggmlType(28).name).toBe("f64");
    expect(ggmlTypeById(4)).toBeUndefined();
    expect(ggmlTypeByName("q4_2")).toBeUndefined();
  });

  it("rejects removed and unknown ids", () => {
    expect([...GGML_REMOVED_TYPE_IDS.keys()]).toEqual([4, 5, 31, 32, 33, 36, 37, 38]);
    for (const id of GGML_REMOVED_TYPE_IDS.keys()) expect(ggmlTypeById(id)).toBeUndefined();
    expect(() => ggmlType(4)).toThrow("ggml type 4 (Q4_2) has been removed");
    expect(() => ggmlType(31)).toThrow("(Q4_0_4_4) has been removed");
    expect(() => ggmlType(43)).toThrow("unknown ggml type 43");
    expect(() => ggmlType("q9_9")).toThrow(/unknown ggml type "q9_9" \(known: f32, f16, q4_0/);
  });
});

describe("ggmlNbytes", () => {
  it("computes (ne0/block)·type_size·ne1·ne2·ne3", () => {
    expect(ggmlNbytes("f32", [3, 4, 5, 6])).toBe(4 * 360);
    expect(ggmlNbytes("f16", [8, 32000])).toBe(512_000);
    expect(ggmlNbytes("q8_0", [64, 3])).toBe(2 * 34 * 3);
    expect(ggmlNbytes("q4_0", [4096, 4096])).toBe(128 * 18 * 4096);
    expect(ggmlNbytes("q4_K", [256, 2, 3])).toBe(144 * 6);
    expect(ggmlNbytes("q6_K", [512])).toBe(420);
    expect(ggmlNbytes("nvfp4", [128, 2])).toBe(2 * 36 * 2);
    expect(ggmlNbytes(ggmlType("iq4_xs"), [1024, 1, 1, 2])).toBe(4 * 136 * 2);
    expect(ggmlRowSize("q8_0", 4096)).toBe(128 * 34);
  });

  it("is 0 for a tensor with an empty dimension", () => {
    expect(ggmlNbytes("q8_0", [32, 0])).toBe(0);
    expect(ggmlNbytes("f32", [0])).toBe(0);
  });

  it("refuses rows that are not whole blocks, bad dimensions and absurd sizes", () => {
    expect(() => ggmlNbytes("q8_0", [30, 2])).toThrow(ModelFormatError);
    expect(() => ggmlNbytes("q8_0", [30, 2])).toThrow(
      "ggml q8_0: ne0 = 30 is not a multiple of the block size 32",
    );
    expect(() => ggmlNbytes("q4_K", [128])).toThrow("block size 256");
    expect(() => ggmlNbytes("f32", [])).toThrow(ModelFormatError);
    expect(() => ggmlNbytes("f32", [-1])).toThrow(ModelFormatError);
    expect(() => ggmlNbytes("f32", [1.5])).toThrow(ModelFormatError);
    expect(() => ggmlNbytes("f32", [2 ** 30, 2 ** 30, 2 ** 30])).toThrow(
      /more than any file can hold/,
    );
  });
});
