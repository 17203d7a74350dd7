import { describe, expect, it } from "vitest";
import {
  bestUnit,
  formatBytes,
  formatGiBValue,
  GiB,
  MiB,
  parseBytes,
  parseSize,
  SizeFormatError,
} from "../lib/config/units";

describe("parseSize", () => {
  it.each([
    ["4096", 4096],
    ["0", 0],
    ["2GiB", 2 * GiB],
    ["2 GiB", 2 * GiB],
    ["512MiB", 512 * MiB],
    ["512mib", 512 * MiB],
    ["1.5GB", 1_500_000_000],
    ["1.5GiB", 1_610_612_736],
    ["12G", 12 * GiB],
    ["64k", 65_536],
    ["64KB", 64_000],
    ["1TiB", 2 ** 40],
    ["2TB", 2e12],
    ["100B", 100],
    [" 768MiB ", 768 * MiB],
    [".5KiB", 512],
    ["1e3", 1000],
    ["0.3GiB", 322_122_547], // floor(0.3 · 2^30 = 322122547.2)
  ])("%s → %d", (text, bytes) => {
    expect(parseSize(text)).toBe(bytes);
  });

  it.each(["", "abc", "-1GiB", "12XB", "1.2.3", "GiB", "1e", "1 e3"])("rejects '%s'", (text) => {
    expect(() => parseSize(text)).toThrow(SizeFormatError);
  });

  it("rejects sizes beyond exact integers", () => {
    expect(() => parseSize("9000000TiB")).toThrow(/too large/);
  });

  it("says what a size looks like", () => {
    expect(() => parseSize("lots")).toThrow(
      "'lots' is not a size; write a number of bytes or a number with a unit, e.g. 12GiB, 512MiB, 1.5GB",
    );
  });

  it("is also exported as parseBytes", () => {
    expect(parseBytes("2GiB")).toBe(2 * GiB);
  });
});

describe("formatBytes", () => {
  it.each([
    [0, "0 B"],
    [300, "300 B"],
    [1536, "1.5 KiB"],
    [512 * MiB, "512.0 MiB"],
    [12 * GiB, "12.0 GiB"],
    [1.25 * GiB, "1.3 GiB"],
    [-20 * GiB, "-20.0 GiB"],
    [3 * 2 ** 40, "3.0 TiB"],
  ])("%d → %s", (bytes, text) => {
    expect(formatBytes(bytes)).toBe(text);
  });

  it("prints in a chosen unit and precision", () => {
    expect(formatBytes(200 * MiB, { unit: "GiB" })).toBe("0.2 GiB");
    expect(formatBytes(0, { unit: "GiB" })).toBe("0.0 GiB");
    expect(formatBytes(1.5 * GiB, { unit: "MiB", digits: 0 })).toBe("1536 MiB");
  });

  it("chooses the largest unit the value reaches", () => {
    expect(bestUnit(1023)).toBe("B");
    expect(bestUnit(1024)).toBe("KiB");
    expect(bestUnit(-3 * GiB)).toBe("GiB");
  });

  it("round-trips through parseSize at its precision", () => {
    expect(parseSize(formatBytes(12 * GiB).replace(" ", ""))).toBe(12 * GiB);
  });
});

describe("formatGiBValue", () => {
  it("prints --max-vram values as written, without float noise", () => {
    expect(formatGiBValue(-1)).toBe("-1");
    expect(formatGiBValue(10.5)).toBe("10.5");
    expect(formatGiBValue(0.1 + 0.2)).toBe("0.3");
  });
});
