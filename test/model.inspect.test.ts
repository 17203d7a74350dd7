import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Command } from "commander";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { register, stringifyReport, type InspectReport } from "../cli/commands/inspect";
import { buildProgram } from "../cli/ferry";
import { genModel } from "../lib/model/genModel";
import { FIXTURES_DIR } from "./fixturesDir";

const LLAMA = join(FIXTURES_DIR, "gguf", "llama-2-tiny-random.gguf");
const OVERALL = join(FIXTURES_DIR, "safetensors-samples", "overall.safetensors");

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "ferry-inspect-test-"));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function inspect(args: string[]): Promise<{ stdout: string; stderr: string; code: number }> {
  let stdout = "";
  let stderr = "";
  let code = 0;
  const program = new Command("ferry").exitOverride();
  program.configureOutput({ writeOut: (s) => (stdout += s), writeErr: (s) => (stderr += s) });
  register(program, {
    stdout: (t) => void (stdout += t),
    stderr: (t) => void (stderr += t),
    setExitCode: (c) => void (code = c),
  });
  await program.parseAsync(["node", "ferry", "inspect", ...args]);
  return { stdout, stderr, code };
}

describe("ferry inspect", () => {
  it("is registered in the ferry program", () => {
    expect(buildProgram().commands.map((c) => c.name())).toContain("inspect");
  });

  it("prints the tiny Llama GGUF: summary, metadata, tensors, segments", async () => {
    const { stdout, stderr, code } = await inspect([LLAMA]);
    expect(stderr).toBe("");
    expect(code).toBe(0);
    const lines = stdout.split("\n");
    expect(lines[0]).toBe(
      `${LLAMA}: GGUF v3, alignment 32; 12 tensors, 1002.1 KiB of weights in a 1.7 MiB file; data starts at byte 724,416`,
    );
    expect(stdout).toContain("metadata (18):");
    expect(stdout).toMatch(/\n {2}general\.architecture +string "llama"\n/);
    expect(stdout).toMatch(/\n {2}llama\.attention\.layer_norm_rms_epsilon +float32 0\.00001\n/);
    // Big arrays are summarized, not printed in full.
    expect(stdout).toMatch(
      /\n {2}tokenizer\.ggml\.tokens +array \[string × 32000\] "<unk>", "<s>", "<\/s>", "<0x00>", …\n/,
    );
    expect(stdout.length).toBeLessThan(5000);
    expect(stdout).toMatch(/\n {2}token_embd\.weight +f16 +\[32000, 8\] +512,000 +724,416\n/);
    expect(stdout).toMatch(/\n {2}blk\.0\.ffn_down\.weight +f16 +\[8, 32\] +512 +1,237,952\n/);
    expect(stdout).toMatch(/segments \(3\):\n {2}NAME +TENSORS +BYTES\n/);
    expect(stdout).toMatch(/\n {2}prelude +1 +512,000 +500\.0 KiB\n/);
    expect(stdout).toMatch(/\n {2}blk\.0 +9 +2,112 +2\.1 KiB\n/);
    expect(stdout).toMatch(/\n {2}final +2 +512,032 +500\.0 KiB\n$/);
  });

  it("--json gives format, metadata, tensors and segments", async () => {
    const { stdout, code } = await inspect([LLAMA, "--json"]);
    expect(code).toBe(0);
    const report = JSON.parse(stdout) as InspectReport;
    expect(Object.keys(report)).toEqual(["format", "metadata", "tensors", "segments"]);
    expect(report.format).toBe("gguf");
    expect(Object.keys(report.metadata)).toHaveLength(18);
    expect(report.metadata["llama.block_count"]).toBe(1);
    expect(report.metadata["llama.attention.layer_norm_rms_epsilon"]).toBe(1e-5);
    expect((report.metadata["tokenizer.ggml.tokens"] as string[]).length).toBe(32000);
    expect((report.metadata["tokenizer.ggml.token_type"] as number[]).slice(0, 3)).toEqual([
      2, 3, 3,
    ]);
    expect(report.tensors).toHaveLength(12);
    expect(report.tensors[0]).toEqual({
      name: "token_embd.weight",
      dtype: "f16",
      shape: [32000, 8],
      bytes: 512_000,
      offset: 724_416,
    });
    expect(report.segments).toEqual([
      { name: "prelude", tensors: 1, bytes: 512_000 },
      { name: "blk.0", tensors: 9, bytes: 2112 },
      { name: "final", tensors: 2, bytes: 512_032 },
    ]);
    // One tensor per line, vocabularies on one line.
    expect(stdout).toContain(
      '\n    {"name": "blk.0.attn_q.weight", "dtype": "f16", "shape": [8,8], "bytes": 128, "offset": 1236416},\n',
    );
    expect(stdout.split("\n").length).toBeLessThan(60);
  });

  it("inspects safetensors and generated DiT files, with a custom segment regex", async () => {
    const { stdout } = await inspect([OVERALL, "--json"]);
    const report = JSON.parse(stdout) as InspectReport;
    expect(report.format).toBe("safetensors");
    expect(report.metadata).toEqual({ test: "a" });
    expect(report.segments).toEqual([{ name: "prelude", tensors: 9, bytes: 168 }]);

    const path = join(dir, "dit.gguf");
    await genModel(path, { blocks: 2, hidden: 32, heads: 2, channels: 32, dtype: "q8_0" });
    const human = (await inspect([path])).stdout;
    expect(human).toContain("Ferry DiT: 2 blocks, hidden 32, 2 heads, 32 channels\n");
    expect(human).toMatch(/\n {2}blocks\.0\.attn\.qkv\.weight +q8_0 +\[96, 32\] +3,264 /);
    const custom = JSON.parse(
      (await inspect([path, "--json", "--segment-regex", "^(blocks\\.\\d+\\.(?:attn|mlp))\\."]))
        .stdout,
    ) as InspectReport;
    expect(custom.segments.map((s) => [s.name, s.tensors])).toEqual([
      ["prelude", 3], // embed.weight, embed.bias, blocks.0.norm1.weight
      ["blocks.0.attn", 4],
      ["blocks.0.mlp", 4],
      ["blocks.1.attn", 4],
      ["blocks.1.mlp", 4],
      ["final", 6], // norm2/norm1 weights after the first block, and final.*
    ]);
  });

  it("fails cleanly: missing file, not a model, corrupt header, bad regex", async () => {
    const missing = await inspect([join(dir, "nope.gguf")]);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/^ferry inspect: ENOENT: no such file or directory/);
    const junk = join(dir, "junk.gguf");
    await writeFile(junk, "GGUF\x03\x00\x00\x00");
    const corrupt = await inspect([junk]);
    expect(corrupt.code).toBe(1);
    expect(corrupt.stderr).toBe(
      `ferry inspect: ${junk}: truncated: tensor count at byte 8 needs 8 bytes, but the file ends at byte 8\n`,
    );
    expect(corrupt.stdout).toBe("");
    const bad = await inspect([LLAMA, "--segment-regex", "blk"]);
    expect(bad.code).toBe(1);
    expect(bad.stderr).toMatch(/^ferry inspect: --segment-regex "blk" has no capture group/);
  });

  it("stringifyReport keeps JSON valid for awkward strings", () => {
    const value = { a: [{ name: 'x": ,"y', n: [1, 2] }], b: { c: [] }, d: {} };
    expect(JSON.parse(stringifyReport(value))).toEqual(value);
  });
});
