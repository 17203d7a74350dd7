import { describe, expect, it } from "vitest";
import { formatPlanJson, planToJson } from "../lib/planner/planJson";
import type { Plan } from "../lib/planner/types";

const plan: Plan = {
  policy: "sdcpp",
  stream: true,
  budget: { B: 11, E: 10, P: 2 },
  segments: [
    {
      index: 0,
      base: [0, 2],
      param_bytes: 300,
      compute_buffer_bytes: 40,
      output_bytes: 5,
      prev_cut_bytes: 6,
      external_bytes: 7,
      resident: true,
    },
    {
      index: 1,
      base: [3, 3],
      param_bytes: 100,
      compute_buffer_bytes: 20,
      output_bytes: 1,
      prev_cut_bytes: 5,
      external_bytes: 7,
      resident: false,
    },
  ],
  resident_bytes: 300,
  streamed_bytes_per_step: 100,
  base_segment_names: ["prelude", "blocks.0", "blocks.1", "final"],
};

describe("planToJson", () => {
  it("has exactly the agreed keys, in order", () => {
    const json = planToJson(plan);
    expect(Object.keys(json)).toEqual([
      "policy",
      "stream",
      "budget",
      "segments",
      "resident_bytes",
      "streamed_bytes_per_step",
    ]);
    expect(Object.keys(json.budget)).toEqual(["B", "E", "P"]);
    for (const segment of json.segments) {
      expect(Object.keys(segment)).toEqual([
        "index",
        "base",
        "param_bytes",
        "compute_buffer_bytes",
        "resident",
      ]);
    }
  });

  it("serialises to this exact text", () => {
    expect(JSON.stringify(planToJson(plan))).toBe(
      '{"policy":"sdcpp","stream":true,"budget":{"B":11,"E":10,"P":2},"segments":[' +
        '{"index":0,"base":[0,2],"param_bytes":300,"compute_buffer_bytes":40,"resident":true},' +
        '{"index":1,"base":[3,3],"param_bytes":100,"compute_buffer_bytes":20,"resident":false}' +
        '],"resident_bytes":300,"streamed_bytes_per_step":100}',
    );
  });

  it("does not share arrays with the plan", () => {
    const json = planToJson(plan);
    json.segments[0].base[0] = 99;
    expect(plan.segments[0].base[0]).toBe(0);
  });

  it("formatPlanJson is the JSON with two-space indentation and a newline", () => {
    const text = formatPlanJson(plan);
    expect(text.endsWith("}\n")).toBe(true);
    expect(JSON.parse(text)).toEqual(planToJson(plan));
    expect(text).toContain('\n  "budget": {\n    "B": 11,');
  });
});
