#!/usr/bin/env node
// Builds everything a fresh clone needs, in order: protos → TypeScript stubs (buf + ts-proto),
// the native addon and its ctest suite (cmake-js), then the TypeScript (tsc).
// `npm ci` runs this through `prepare`; `--only proto|native|ts` runs one stage.
import { spawnSync } from "node:child_process";
import { rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const bin = (name) => join(root, "node_modules", ".bin", name);
const onlyIndex = process.argv.indexOf("--only");
const only = onlyIndex >= 0 ? process.argv[onlyIndex + 1] : undefined;

function run(label, command, args, options = {}) {
  process.stderr.write(`[ferry build] ${label}\n`);
  const result = spawnSync(command, args, { cwd: root, stdio: "inherit", ...options });
  if (result.error) {
    fail(`${label}: could not start ${command}: ${result.error.message}`);
  }
  if (result.status !== 0) {
    fail(`${label} failed (exit ${result.status}).`);
  }
}

function fail(message) {
  process.stderr.write(`\n[ferry build] ERROR: ${message}\n`);
  process.exit(1);
}

function requireTool(command, args, hint) {
  const probe = spawnSync(command, args, { stdio: "ignore" });
  if (probe.error || probe.status !== 0) {
    fail(`'${command}' was not found, and Ferry's native addon needs it. ${hint}`);
  }
}

function buildProto() {
  rmSync(join(root, "gen"), { recursive: true, force: true });
  run("protos → gen/ (buf generate, ts-proto)", bin("buf"), ["generate"]);
}

function buildNative() {
  requireTool("cmake", ["--version"], "Install CMake ≥ 3.18 (Debian: apt-get install cmake).");
  const cxx = process.env.CXX ?? "c++";
  requireTool(cxx, ["--version"], "Install a C++17 compiler (Debian: apt-get install g++).");
  const parallel = String(Math.max(1, Number(process.env.FERRY_BUILD_JOBS ?? 2)));
  run("native addon + ctest suite → build/ (cmake-js)", bin("cmake-js"), [
    "compile",
    "--out",
    "build",
    "--config",
    process.env.FERRY_BUILD_TYPE ?? "Release",
    "--parallel",
    parallel,
    "--CDFERRY_BUILD_TESTS=ON",
  ]);
}

function buildTs() {
  run("TypeScript → dist/ (tsc)", bin("tsc"), ["-p", "tsconfig.build.json"]);
}

const stages = { proto: buildProto, native: buildNative, ts: buildTs };
if (only) {
  if (!stages[only]) fail(`unknown stage '${only}' (expected proto, native or ts)`);
  stages[only]();
} else {
  buildProto();
  buildNative();
  buildTs();
}
