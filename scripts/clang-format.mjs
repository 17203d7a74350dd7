#!/usr/bin/env node
// Checks (--check) or rewrites (--fix) the formatting of the native sources with the pinned
// clang-format from node_modules, so every machine formats alike.
import { spawnSync } from "node:child_process";
import { readdirSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const fix = process.argv.includes("--fix");
const files = [];
(function walk(dir) {
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) walk(path);
    else if (/\.(c|cc|cpp|h|hpp|cu|cuh)$/.test(entry.name)) files.push(path);
  }
})(join(root, "native"));

// The binary itself, not the npm wrapper (which throws a stack trace on a non-zero exit).
const clangFormat = createRequire(import.meta.url)("clang-format").getNativeBinary();
const args = fix ? ["-i", ...files] : ["--dry-run", "--Werror", ...files];
const result = spawnSync(clangFormat, args, { stdio: "inherit" });
if (result.error) {
  console.error(`clang-format could not run: ${result.error.message}`);
  process.exit(1);
}
if (result.status !== 0 && !fix) console.error("C++ formatting differs: run `npm run format`.");
process.exit(result.status ?? 1);
