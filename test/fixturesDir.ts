import { existsSync } from "node:fs";
import { join } from "node:path";
import { packageRoot } from "../lib/packageInfo";

/**
 * The shared fixtures (real files written by others): `FERRY_FIXTURES_DIR`, else `shared/`
 * beside the checkout (as CI lays it out), else the workspace's copy.
 */
export const FIXTURES_DIR: string =
  [
    process.env.FERRY_FIXTURES_DIR,
    join(packageRoot(), "..", "shared", "fixtures"),
    "/work/shared/fixtures",
  ].find((dir): dir is string => dir !== undefined && existsSync(dir)) ??
  join(packageRoot(), "..", "shared", "fixtures");
