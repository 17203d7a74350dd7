import { status } from "@grpc/grpc-js";
import { describe, expect, it } from "vitest";
import {
  DeviceUnavailableError,
  IntegrityError,
  InvalidArgumentError,
  IoError,
} from "../lib/native/addon";
import { PlanError } from "../lib/planner/types";
import { StatusError, toStatusError } from "../lib/wire/statusError";

// The one error → status mapper: every native error name keeps its meaning; only the unknown is
// INTERNAL (and logged).
describe("toStatusError", () => {
  const cases: [unknown, status][] = [
    [new InvalidArgumentError("bad plan"), status.INVALID_ARGUMENT],
    [Object.assign(new Error("corrupt"), { name: "ModelFormatError" }), status.INVALID_ARGUMENT],
    [
      Object.assign(new Error("oom"), { name: "DeviceOutOfMemoryError" }),
      status.RESOURCE_EXHAUSTED,
    ],
    [Object.assign(new Error("stop"), { name: "CancelledError" }), status.CANCELLED],
    [Object.assign(new Error("busy"), { name: "DeviceBusyError" }), status.UNAVAILABLE],
    [new DeviceUnavailableError("no GPU"), status.UNAVAILABLE],
    [new IntegrityError("checksum differs"), status.DATA_LOSS],
    [new IoError("read failed"), status.FAILED_PRECONDITION],
    [new PlanError("budget"), status.RESOURCE_EXHAUSTED],
    [new StatusError(status.NOT_FOUND, "no such job"), status.NOT_FOUND],
  ];
  for (const [error, code] of cases) {
    it(`maps ${(error as Error).name} to ${status[code]}`, () => {
      const logged: string[] = [];
      const mapped = toStatusError(error, (line) => logged.push(line));
      expect(mapped.code).toBe(code);
      expect(mapped.message).toBe((error as Error).message);
      expect(logged).toEqual([]);
    });
  }

  it("maps anything else to INTERNAL and logs the cause", () => {
    const logged: string[] = [];
    const mapped = toStatusError(new TypeError("x is undefined"), (line) => logged.push(line));
    expect(mapped.code).toBe(status.INTERNAL);
    expect(logged.join("\n")).toMatch(/x is undefined/);
  });
});
