import { existsSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";

/**
 * The package root (the folder holding Ferry's package.json). Code runs both from TypeScript
 * sources (vitest) and from dist/ (the CLI), at different depths, so it is found by walking up.
 */
export function packageRoot(): string {
  let dir = __dirname;
  for (;;) {
    const candidate = join(dir, "package.json");
    if (existsSync(candidate)) {
      const pkg = JSON.parse(readFileSync(candidate, "utf8")) as { name?: string };
      if (pkg.name === "ferry") return dir;
    }
    const parent = dirname(dir);
    if (parent === dir) throw new Error(`cannot find Ferry's package.json above ${__dirname}`);
    dir = parent;
  }
}

let cachedVersion: string | undefined;

/** Ferry's version, from package.json. */
export function ferryVersion(): string {
  cachedVersion ??= (
    JSON.parse(readFileSync(join(packageRoot(), "package.json"), "utf8")) as { version: string }
  ).version;
  return cachedVersion;
}
