import type { DeviceProfile, ModelProfile } from "../model/profile";
import { buildCostModel } from "./costModel";
import { planFerry } from "./ferryPolicy";
import { lowerBound, memoryCap } from "./lowerBound";
import { parseDeviceProfile, parseModelProfile } from "./profileFile";
import { planSdcpp } from "./sdcpp";
import { executionOf } from "./execution";
import { simulatePlan } from "./simulate";
import { PlanError, type Plan, type PlanOptions, type PolicyName } from "./types";

type Policy = (model: ModelProfile, device: DeviceProfile, options: PlanOptions) => Plan;

/** Every planning policy by name. A new policy registers here and reuses budget.ts. */
const POLICIES: Record<PolicyName, Policy> = {
  sdcpp: planSdcpp,
  // sd.cpp's prefetch PR changed execution only: merging and the resident prefix are as before.
  "sdcpp-prefetch": (model, device, options) => ({
    ...planSdcpp(model, device, options),
    policy: "sdcpp-prefetch",
  }),
  ferry: planFerry,
};

/** The policies `planJob` knows, for help texts and validation. */
export const KNOWN_POLICIES = Object.keys(POLICIES) as PolicyName[];

export function isPolicyName(name: string): name is PolicyName {
  return Object.prototype.hasOwnProperty.call(POLICIES, name);
}

/**
 * Plans which merged segments of a model stay resident on a device and which are streamed each
 * step. The profiles are validated first (a NaN or negative size fails naming the field), then
 * the policy named in `options` makes the plan. Every plan leaves with `slots`, `predicted_step_s`
 * and `lower_bound_s`: a policy that does not set them (sdcpp, sdcpp-prefetch) is priced here on
 * the same simulator as the `ferry` policy (slots 0, serial or with lookahead), so they compare
 * directly.
 * @throws PlanError for an unknown policy, a bad profile, or a model the budget cannot hold.
 */
export function planJob(model: ModelProfile, device: DeviceProfile, options: PlanOptions): Plan {
  // Callers outside TypeScript may leave out the fields that have documented defaults.
  const policyName: string = options.policy ?? "sdcpp";
  const stream: unknown = options.stream ?? true;
  if (!isPolicyName(policyName)) {
    throw new PlanError(`unknown policy '${policyName}' (known: ${KNOWN_POLICIES.join(", ")})`);
  }
  if (typeof stream !== "boolean") {
    throw new PlanError(`stream must be true or false (got ${String(stream)})`);
  }
  // In-memory estimates may be fractional; only files must give whole bytes.
  const checkedModel = parseModelProfile(model, { wholeBytes: false });
  const checkedDevice = parseDeviceProfile(device, { wholeBytes: false });
  const checkedOptions: PlanOptions = { ...options, policy: policyName, stream };
  const plan = POLICIES[policyName](checkedModel, checkedDevice, checkedOptions);
  return withPrediction(plan, checkedModel, checkedDevice, checkedOptions);
}

/** The plan with `slots`, `predicted_step_s` and `lower_bound_s` filled in where missing. */
function withPrediction(
  plan: Plan,
  model: ModelProfile,
  device: DeviceProfile,
  options: PlanOptions,
): Plan {
  if (
    plan.slots !== undefined &&
    plan.predicted_step_s !== undefined &&
    plan.lower_bound_s !== undefined
  ) {
    return plan;
  }
  const cost = buildCostModel(model, device, options.cost);
  const slots = plan.slots ?? 0;
  const noSplit = options.maxVramGiB === 0;
  return {
    ...plan,
    slots,
    predicted_step_s:
      plan.predicted_step_s ??
      simulatePlan({ ...plan, slots }, cost, { lookahead: executionOf(plan) === "lookahead" })
        .step_s,
    lower_bound_s:
      plan.lower_bound_s ??
      lowerBound(cost, memoryCap(device, options), options.stream && !noSplit).lower_bound_s,
  };
}
