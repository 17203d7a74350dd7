/**
 * What the planner knows about a model and a device. A model file is reduced to a
 * `ModelProfile` from its header alone (lib/model/segments.ts); a profile JSON file
 * (`ferry plan --profile p.json`) gives the same shape for real models Ferry cannot load.
 * Field names are snake_case because they are the profile file's field names.
 */

/** One base segment: the prelude, one block of the network, or the final segment. */
export interface BaseSegment {
  name: string;
  /** Bytes of the segment's weights as stored (ggml `nbytes`, quantization-aware). */
  param_bytes: number;
  /** Activations working set while the segment computes. */
  compute_buffer_bytes: number;
  /** Bytes of the segment's output. */
  output_bytes: number;
  /** Bytes of earlier segments' outputs this segment reads. */
  prev_cut_bytes: number;
  /** Bytes of inputs from outside the network (e.g. text conditioning). */
  external_bytes: number;
  /** Floating-point operations of one forward pass of the segment. */
  flops: number;
}

export interface ModelProfile {
  name: string;
  segments: BaseSegment[];
}

export interface DeviceProfile {
  name: string;
  total_bytes: number;
  free_bytes: number;
  /** Host→device bandwidth, GB/s (pinned). 0 = unknown/unlimited. */
  h2d_gbps: number;
  /** Compute rate, TFLOP/s. 0 = unknown. */
  tflops: number;
  /** Per-dispatch overhead, microseconds. */
  dispatch_us: number;
}
