import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readInputDir, resolveJobShape } from "../cli/jobShapeFlags";

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "ferry-job-flags-"));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const floats = (n: number) => new Uint8Array(new Float32Array(n).buffer);

describe("ferry run / plan job-shape flags", () => {
  it("takes image tokens from --img-tokens, --tokens or --width/--height, one of them", () => {
    expect(resolveJobShape({}, 64)).toEqual({ tokens: 64, contextTokens: 0 });
    expect(resolveJobShape({ imgTokens: "300", txtTokens: "77" }, 64)).toEqual({
      tokens: 300,
      contextTokens: 77,
    });
    expect(resolveJobShape({ width: "1024", height: "768" }, 64).tokens).toBe(64 * 48);
    expect(() => resolveJobShape({ tokens: "4", imgTokens: "4" }, 64)).toThrow(/not several/);
    expect(() => resolveJobShape({ width: "1024" }, 64)).toThrow(/go together/);
    expect(() => resolveJobShape({ width: "1000", height: "1024" }, 64)).toThrow(/multiple of 16/);
    expect(() => resolveJobShape({ txtTokens: "0" }, 64)).toThrow(/--txt-tokens/);
  });

  it("reads the inputs DIR holds with their shapes; text tokens from txt.bin when not given", async () => {
    await writeFile(join(dir, "img.bin"), floats(2 * 16 * 64));
    await writeFile(join(dir, "txt.bin"), floats(2 * 7 * 4096));
    await writeFile(join(dir, "notes.txt"), "ignored");
    const read = await readInputDir(dir, { batch: 2, tokens: 16, contextTokens: 0 });
    expect(read.contextTokens).toBe(7);
    expect(read.inputs.map((t) => [t.name, t.shape, t.data.length])).toEqual([
      ["img", [2, 16, 64], 2 * 16 * 64 * 4],
      ["txt", [2, 7, 4096], 2 * 7 * 4096 * 4],
    ]);
    await writeFile(join(dir, "vec.bin"), new Uint8Array(6));
    await expect(readInputDir(dir, { batch: 2, tokens: 16, contextTokens: 0 })).rejects.toThrow(
      /vec\.bin is 6 bytes, not whole float32s/,
    );
    const empty = await mkdtemp(join(dir, "empty-"));
    await expect(readInputDir(empty, { batch: 1, tokens: 1, contextTokens: 0 })).rejects.toThrow(
      /none of img\.bin, txt\.bin, vec\.bin, img_ids\.bin, z\.bin is there/,
    );
  });
});
