import { Plan as PlanMessage, type DeviceInfo } from "../../gen/ferry/v1/scheduler";
import type { DeviceProfile, Plan } from "../../lib/planner/types";

/** The planner's plan as the wire message sent to executors and clients. */
export function planToMessage(plan: Plan): PlanMessage {
  return PlanMessage.fromPartial({
    policy: plan.policy,
    stream: plan.stream,
    budgetB: plan.budget.B,
    budgetE: plan.budget.E,
    budgetP: plan.budget.P,
    segments: plan.segments.map((segment) => ({
      index: segment.index,
      firstBase: segment.base[0],
      lastBase: segment.base[1],
      paramBytes: segment.param_bytes,
      computeBufferBytes: segment.compute_buffer_bytes,
      outputBytes: segment.output_bytes,
      prevCutBytes: segment.prev_cut_bytes,
      externalBytes: segment.external_bytes,
      resident: segment.resident,
    })),
    residentBytes: plan.resident_bytes,
    streamedBytesPerStep: plan.streamed_bytes_per_step,
    baseSegmentNames: plan.base_segment_names,
    slots: plan.slots ?? 0,
    predictedStepS: plan.predicted_step_s ?? 0,
    lowerBoundS: plan.lower_bound_s ?? 0,
  });
}

/** The wire plan back as the planner's type (for `ferry plan --scheduler`, the client, tests). */
export function planFromMessage(message: PlanMessage): Plan {
  return {
    policy: message.policy as Plan["policy"],
    stream: message.stream,
    budget: { B: message.budgetB, E: message.budgetE, P: message.budgetP },
    segments: message.segments.map((segment) => ({
      index: segment.index,
      base: [segment.firstBase, segment.lastBase],
      param_bytes: segment.paramBytes,
      compute_buffer_bytes: segment.computeBufferBytes,
      output_bytes: segment.outputBytes,
      prev_cut_bytes: segment.prevCutBytes,
      external_bytes: segment.externalBytes,
      resident: segment.resident,
    })),
    resident_bytes: message.residentBytes,
    streamed_bytes_per_step: message.streamedBytesPerStep,
    base_segment_names: message.baseSegmentNames,
    ...(message.slots ? { slots: message.slots } : {}),
    ...(message.predictedStepS ? { predicted_step_s: message.predictedStepS } : {}),
    ...(message.lowerBoundS ? { lower_bound_s: message.lowerBoundS } : {}),
  };
}

/** What the planner needs of an executor's device. */
export function deviceProfileOf(device: DeviceInfo): DeviceProfile {
  return {
    name: device.name,
    total_bytes: device.totalBytes,
    free_bytes: device.freeBytes,
    h2d_gbps: device.h2dGbps,
    tflops: device.tflops,
    dispatch_us: device.dispatchUs,
  };
}
