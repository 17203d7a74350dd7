#include "run.h"

#include <atomic>
#include <cmath>
#include <cstring>
#include <optional>
#include <thread>

#include "common.h"
#include "cpu_device_wrap.h"
#include "ferry/errors.h"
#include "ferry/runner.h"
#include "model_wrap.h"

namespace ferry {
namespace addon {

namespace {

struct RunState;

// What the run's thread hands the main thread: a step report or a pipeline stage's handoff. One
// channel carries both, in the order the run made them, so every handoff reaches onHandoff
// before the run's promise settles, and nothing but this channel can keep the process alive.
struct Message {
  std::unique_ptr<StepReport> report;
  int64_t handoff_step = 0;
  std::unique_ptr<HostTensors> handoff;
};
void deliver_message(Napi::Env env, Napi::Function unused, RunState* state, Message* message);
using StepChannel = Napi::TypedThreadSafeFunction<RunState, Message, deliver_message>;

// A stage run's link: handoffs from deliver() wait in the inbox; handoffs it sends go to
// onHandoff through the run's channel.
class AddonLink final : public StageLink {
 public:
  explicit AddonLink(RunState* state) : state_(state) {}
  bool receive(int64_t step, const std::atomic<bool>* cancel, HostTensors* out) override;
  void send(int64_t step, HostTensors&& tensors) override;
  HandoffInbox inbox;

 private:
  RunState* state_;
};

// One run, shared by its native thread, the JS `cancel` and `deliver` functions and the channel's
// finalizer. The thread is joined, and the promise settled, by the finalizer on the main thread,
// after the last step report and handoff have been delivered.
struct RunState {
  std::shared_ptr<Device> device;
  std::shared_ptr<Model> model;
  DeviceLease lease;  // declared after `device`: released before the device can go
  RunRequest request;
  std::atomic<bool> cancel{false};
  std::atomic<bool> finished{false};
  PlanMailbox plans;          // swapPlan(): taken by the run at its next step boundary
  AddonLink link{this};       // a pipeline stage's handoffs
  bool tearing_down = false;  // main thread only
  std::thread thread;
  StepChannel channel;
  std::optional<Napi::Promise::Deferred> deferred;
  Napi::ObjectReference device_object;  // keep the wraps alive for external-memory accounting
  Napi::ObjectReference model_object;
  Napi::FunctionReference on_step;
  Napi::FunctionReference on_handoff;
  Napi::ObjectReference callback_error;  // onStep or onHandoff threw: the run stops, rejects
  std::optional<RunOutput> output;
  std::optional<CapturedError> error;
  std::optional<Napi::Env::CleanupHook<void (*)(RunState*), RunState>> cleanup_hook;
};

Napi::Object event_object(Napi::Env env, const RunEvent& e) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("kind", event_kind_name(e.kind));
  o.Set("segment", e.segment);
  o.Set("startUs", e.start_us);
  o.Set("endUs", e.end_us);
  o.Set("bytes", size_value(env, e.bytes));
  if (const char* source = param_source_name(e.source)) o.Set("source", source);
  if (e.cold != Cold::kUnset) o.Set("cold", e.cold == Cold::kTrue);
  if (e.kind == EventKind::kCompute) o.Set("stallUs", e.stall_us);
  return o;
}

Napi::Object report_object(Napi::Env env, const StepReport& r) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("step", Napi::Number::New(env, static_cast<double>(r.step)));
  o.Set("stepStartUs", r.start_us);
  o.Set("stepEndUs", r.end_us);
  o.Set("h2dBytes", size_value(env, r.h2d_bytes));
  o.Set("diskBytes", size_value(env, r.disk_bytes));
  o.Set("arenaPeakBytes", size_value(env, r.arena_peak_bytes));
  o.Set("allocations", size_value(env, r.allocations));
  o.Set("hostPeakBytes", size_value(env, r.host_peak_bytes));
  o.Set("stallUs", r.stall_us);
  o.Set("residentHitBytes", size_value(env, r.resident_hit_bytes));
  Napi::Array events = Napi::Array::New(env, r.events.size());
  for (size_t i = 0; i < r.events.size(); i++) events.Set(i, event_object(env, r.events[i]));
  o.Set("events", events);
  return o;
}

// The handoff as { name: Float32Array }, each array over the native vector it came in (moved to
// the heap and freed by the ArrayBuffer's finalizer): no copy crosses the boundary.
Napi::Object handoff_object(Napi::Env env, HostTensors& tensors) {
  Napi::Object o = Napi::Object::New(env);
  for (auto& [name, values] : tensors) {
    auto owned = std::make_unique<std::vector<float>>(std::move(values));
    const size_t length = owned->size();
    if (owned->empty()) owned->reserve(1);  // a non-null pointer for an empty array
    Napi::ArrayBuffer buffer = Napi::ArrayBuffer::New(
        env, owned->data(), length * sizeof(float),
        [](Napi::Env, void*, std::vector<float>* vector) { delete vector; }, owned.get());
    owned.release();
    o.Set(name, Napi::Float32Array::New(env, length, buffer, 0));
  }
  return o;
}

void deliver_message(Napi::Env env, Napi::Function, RunState* state, Message* message) {
  std::unique_ptr<Message> owned(message);
  // A null env: the channel is being torn down with messages still queued; just free them.
  if (env == nullptr || !state->callback_error.IsEmpty()) return;
  try {
    if (owned->report && !state->on_step.IsEmpty()) {
      state->on_step.Call({report_object(env, *owned->report)});
    } else if (owned->handoff && !state->on_handoff.IsEmpty()) {
      state->on_handoff.Call({Napi::Number::New(env, static_cast<double>(owned->handoff_step)),
                              handoff_object(env, *owned->handoff)});
    }
  } catch (const Napi::Error& e) {
    state->callback_error = Napi::Persistent(e.Value());
    state->cancel.store(true);
  }
}

bool AddonLink::receive(int64_t step, const std::atomic<bool>* cancel, HostTensors* out) {
  return inbox.wait(step, cancel, out);
}

void AddonLink::send(int64_t step, HostTensors&& tensors) {
  auto message = std::make_unique<Message>();
  message->handoff_step = step;
  message->handoff = std::make_unique<HostTensors>(std::move(tensors));
  if (state_->channel.NonBlockingCall(message.get()) == napi_ok) {
    message.release();
  } else {
    state_->cancel.store(true);  // the environment is going away: nobody is listening
  }
}

Napi::Object output_object(Napi::Env env, const RunOutput& out) {
  Napi::Float32Array values = Napi::Float32Array::New(env, out.output.size());
  std::memcpy(values.Data(), out.output.data(), out.output.size() * sizeof(float));
  Napi::Array shape = Napi::Array::New(env, out.shape.size());
  for (uint32_t i = 0; i < out.shape.size(); i++)
    shape.Set(i, Napi::Number::New(env, static_cast<double>(out.shape[i])));
  Napi::Object o = Napi::Object::New(env);
  o.Set("name", out.name);
  o.Set("output", values);
  o.Set("shape", shape);
  o.Set("computeBufferBytes", size_value(env, out.compute_buffer_bytes));
  return o;
}

void finalize_run(Napi::Env env, std::shared_ptr<RunState>* holder, RunState*) {
  std::shared_ptr<RunState> state = std::move(*holder);
  delete holder;
  // At environment teardown the channel closes while the run may still be going: stop it at its
  // next segment boundary, then wait for it, so nothing outlives the environment.
  if (!state->finished.load()) state->cancel.store(true);
  if (state->thread.joinable()) state->thread.join();
  if (state->tearing_down) return;
  if (state->cleanup_hook) state->cleanup_hook->Remove(env);
  try {
    if (auto* w = unwrap_device(env, state->device_object.Value())) w->sync_external_memory(env);
    if (auto* w = ModelWrap::Unwrap(state->model_object.Value())) w->sync_external_memory(env);
    if (!state->callback_error.IsEmpty()) {
      state->deferred->Reject(state->callback_error.Value());
    } else if (state->error) {
      state->deferred->Reject(to_js_error(env, *state->error).Value());
    } else {
      state->deferred->Resolve(output_object(env, *state->output));
    }
  } catch (const Napi::Error& e) {
    state->deferred->Reject(e.Value());
  }
  state->device_object.Reset();
  state->model_object.Reset();
  state->callback_error.Reset();
  state->on_step.Reset();
  state->on_handoff.Reset();
}

void on_env_teardown(RunState* state) {
  state->tearing_down = true;
  state->cancel.store(true);
}

void run_thread(std::shared_ptr<RunState> state) {
  try {
    state->output = run_job(
        state->lease, *state->model, state->request, &state->cancel,
        [&state](StepReport&& report) {
          auto boxed = std::make_unique<Message>();
          boxed->report = std::make_unique<StepReport>(std::move(report));
          if (state->channel.NonBlockingCall(boxed.get()) == napi_ok) {
            boxed.release();
          } else {
            // The environment is going away: nobody is listening.
            state->cancel.store(true);
          }
        },
        &state->plans);
  } catch (...) {
    state->error = capture_exception(std::current_exception());
  }
  // Free the device before the promise settles, so code awaiting it can start the next job.
  state->lease.reset();
  state->finished.store(true);
  StepChannel channel = state->channel;
  state.reset();
  channel.Release();
}

std::vector<PlanSegment> parse_segments(Napi::Env env, const Napi::Value& segments,
                                        const std::string& where) {
  if (!segments.IsArray()) throw_invalid_argument(env, where + ".segments must be an array");
  Napi::Array list = segments.As<Napi::Array>();
  std::vector<PlanSegment> out;
  for (uint32_t i = 0; i < list.Length(); i++) {
    const std::string at = where + ".segments[" + std::to_string(i) + "]";
    Napi::Object s = object_arg(list.Get(i), at);
    PlanSegment p;
    p.first_base = static_cast<int64_t>(uint_field(s, "firstBase", at));
    p.last_base = static_cast<int64_t>(uint_field(s, "lastBase", at));
    p.resident = bool_field(s, "resident", at);
    out.push_back(p);
  }
  return out;
}

RunRequest parse_request(Napi::Env env, const Napi::Value& value) {
  const std::string where = "startRun request";
  Napi::Object o = object_arg(value, where);
  RunRequest r;
  r.job.batch = static_cast<int64_t>(uint_field(o, "batch", where));
  r.job.tokens = static_cast<int64_t>(uint_field(o, "tokens", where));
  r.job.context_tokens = static_cast<int64_t>(uint_field_or(o, "contextTokens", where, 0));
  r.steps = static_cast<int64_t>(uint_field(o, "steps", where));
  Napi::Value seed = o.Get("seed");
  if (seed.IsBigInt()) {
    bool lossless = false;
    r.seed = seed.As<Napi::BigInt>().Uint64Value(&lossless);
    if (!lossless) throw_invalid_argument(env, where + ".seed must be in [0, 2^64)");
  } else if (seed.IsUndefined()) {
    r.seed = 0;
  } else {
    r.seed = uint_field(o, "seed", where);
  }
  r.first_sample = uint_field_or(o, "firstSample", where, 0);
  if (has_field(o, "inputs")) {
    Napi::Object inputs = object_arg(o.Get("inputs"), where + ".inputs");
    Napi::Array names = inputs.GetPropertyNames();
    for (uint32_t i = 0; i < names.Length(); i++) {
      const std::string name = names.Get(i).As<Napi::String>().Utf8Value();
      Napi::Value input = inputs.Get(name);
      if (!input.IsTypedArray() ||
          input.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array) {
        throw_invalid_argument(env, where + ".inputs." + name + " must be a Float32Array");
      }
      Napi::Float32Array a = input.As<Napi::Float32Array>();
      r.inputs[name].assign(a.Data(), a.Data() + a.ElementLength());
    }
  }
  r.sampler.guidance = number_field_or(o, "guidance", where, 3.5);
  r.sampler.shift = has_field(o, "shift") ? bool_field(o, "shift", where) : false;
  r.segments = parse_segments(env, o.Get("segments"), where);
  const uint64_t slots = uint_field_or(o, "slots", where, 0);
  if (slots > kMaxSlots) {
    throw_invalid_argument(env, where + ".slots must be between 0 and " +
                                    std::to_string(kMaxSlots) + " (got " + std::to_string(slots) +
                                    ")");
  }
  r.slots = static_cast<uint32_t>(slots);
  // slots ≥ 1 means pooled; with none, "serial" unless the request asks for "lookahead".
  const std::string execution =
      string_field_or(o, "execution", where, slots > 0 ? "pooled" : "serial");
  if (execution == "serial") {
    r.execution = Execution::kSerial;
  } else if (execution == "lookahead") {
    r.execution = Execution::kLookahead;
  } else if (execution == "pooled") {
    r.execution = Execution::kPooled;
  } else {
    throw_invalid_argument(env, where + ".execution must be \"serial\", \"lookahead\" or " +
                                    "\"pooled\", got \"" + execution + "\"");
  }
  const std::string backend = string_field_or(o, "paramsBackend", where, "cpu");
  if (backend == "cpu" || backend.empty()) {  // "": the executor's default
    r.params_backend = ParamsBackend::kCpu;
  } else if (backend == "disk") {
    r.params_backend = ParamsBackend::kDisk;
  } else {
    throw_invalid_argument(
        env, where + ".paramsBackend must be \"cpu\" or \"disk\", got \"" + backend + "\"");
  }
  const std::string load = string_field_or(o, "load", where, "lazy");
  if (load == "lazy" || load.empty()) {
    r.load = LoadMode::kLazy;
  } else if (load == "eager") {
    r.load = LoadMode::kEager;
  } else if (load == "background") {
    r.load = LoadMode::kBackground;
  } else {
    throw_invalid_argument(
        env, where + ".load must be \"lazy\", \"eager\" or \"background\", got \"" + load + "\"");
  }
  r.verify = has_field(o, "verify") ? bool_field(o, "verify", where) : false;
  if (has_field(o, "stage")) {
    Napi::Object stage = object_arg(o.Get("stage"), where + ".stage");
    PipelineStage st;
    st.first_base = static_cast<int64_t>(uint_field(stage, "firstBase", where + ".stage"));
    st.last_base = static_cast<int64_t>(uint_field(stage, "lastBase", where + ".stage"));
    r.stage = st;
  }
  return r;
}

// { name: Float32Array } → host tensors (copied); InvalidArgumentError naming what is wrong.
HostTensors parse_tensors(Napi::Env env, const Napi::Value& value, const std::string& where) {
  if (!value.IsObject() || value.IsArray() || value.IsTypedArray()) {
    throw_invalid_argument(env, where + " must be an object of Float32Arrays by name");
  }
  Napi::Object tensors = value.As<Napi::Object>();
  Napi::Array names = tensors.GetPropertyNames();
  HostTensors out;
  for (uint32_t i = 0; i < names.Length(); i++) {
    const std::string name = names.Get(i).As<Napi::String>().Utf8Value();
    Napi::Value tensor = tensors.Get(name);
    if (!tensor.IsTypedArray() ||
        tensor.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array) {
      throw_invalid_argument(env, where + "." + name + " must be a Float32Array");
    }
    Napi::Float32Array a = tensor.As<Napi::Float32Array>();
    out[name].assign(a.Data(), a.Data() + a.ElementLength());
  }
  return out;
}

}  // namespace

Napi::Value start_run(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  AddonData& data = addon_data(env);
  DeviceWrapBase* device_wrap = unwrap_device(env, info[0]);
  if (!device_wrap) {
    throw_invalid_argument(env, "startRun: the first argument must be a CpuDevice or GpuDevice");
  }
  if (!info[1].IsObject() || !info[1].As<Napi::Object>().InstanceOf(data.model_class.Value())) {
    throw_invalid_argument(env, "startRun: the second argument must be a Model from openModel()");
  }
  if (!info[3].IsUndefined() && !info[3].IsFunction()) {
    throw_invalid_argument(env, "startRun: onStep must be a function");
  }
  if (!info[4].IsUndefined() && !info[4].IsFunction()) {
    throw_invalid_argument(env, "startRun: onHandoff must be a function");
  }
  auto* model_wrap = ModelWrap::Unwrap(info[1].As<Napi::Object>());

  auto state = std::make_shared<RunState>();
  state->device = device_wrap->device_or_null();
  if (!state->device) throw_invalid_argument(env, "startRun: the device has been disposed");
  state->model = model_wrap->model(env);
  state->request = parse_request(env, info[2]);
  if (state->request.stage) {
    const int64_t n = static_cast<int64_t>(state->model->base_segments().size());
    const PipelineStage& st = *state->request.stage;
    // A stage of a split hands activations on (or, the last, back to the first): it needs
    // somewhere to send them. The range itself is checked by the run.
    if (!(st.first_base == 0 && st.last_base == n - 1) && !info[4].IsFunction()) {
      throw_invalid_argument(env, "startRun: a pipeline stage (base segments " +
                                      std::to_string(st.first_base) + ".." +
                                      std::to_string(st.last_base) + " of 0.." +
                                      std::to_string(n - 1) + ") needs onHandoff");
    }
    state->request.stage->link = &state->link;
  }
  state->deferred.emplace(Napi::Promise::Deferred::New(env));

  Napi::Object handle = Napi::Object::New(env);
  handle.Set("done", state->deferred->Promise());
  std::weak_ptr<RunState> weak = state;
  handle.Set("cancel", Napi::Function::New(
                           env,
                           [weak](const Napi::CallbackInfo& cb) {
                             if (auto s = weak.lock()) s->cancel.store(true);
                             return cb.Env().Undefined();
                           },
                           "cancel"));

  // swapPlan({ segments, slots }): a pooled run takes the new plan at its next step boundary
  // (checked against the model there; a bad one fails the run).
  handle.Set("swapPlan", Napi::Function::New(
                             env,
                             [weak](const Napi::CallbackInfo& cb) {
                               Napi::Env e = cb.Env();
                               Napi::Object plan = object_arg(cb[0], "swapPlan(plan)");
                               std::vector<PlanSegment> segments =
                                   parse_segments(e, plan.Get("segments"), "swapPlan(plan)");
                               const uint64_t slots = uint_field(plan, "slots", "swapPlan(plan)");
                               if (slots < 1 || slots > kMaxSlots) {
                                 throw_invalid_argument(
                                     e, "swapPlan(plan).slots must be between 1 and " +
                                            std::to_string(kMaxSlots));
                               }
                               if (auto s = weak.lock()) {
                                 s->plans.post(std::move(segments), static_cast<uint32_t>(slots));
                               }
                               return e.Undefined();
                             },
                             "swapPlan"));

  // deliver(step, tensors): the previous stage's handoff labelled `step`, copied into the run's
  // inbox, where the run takes it before that step. Ignored once the run has finished.
  handle.Set("deliver",
             Napi::Function::New(
                 env,
                 [weak](const Napi::CallbackInfo& cb) {
                   Napi::Env e = cb.Env();
                   const std::string where = "deliver(step, tensors)";
                   if (!cb[0].IsNumber()) {
                     throw_invalid_argument(e, where + ": step must be a number");
                   }
                   const double step = cb[0].As<Napi::Number>().DoubleValue();
                   if (!(step >= 1 && step <= 9007199254740991.0) || std::floor(step) != step) {
                     throw_invalid_argument(e, where + ": step must be an integer ≥ 1");
                   }
                   HostTensors tensors = parse_tensors(e, cb[1], where + ": tensors");
                   if (auto s = weak.lock()) {
                     if (!s->finished.load()) {
                       s->link.inbox.put(static_cast<int64_t>(step), std::move(tensors));
                     }
                   }
                   return e.Undefined();
                 },
                 "deliver"));

  // Several runs may share a device (the memory arbiter admits each against the budget left);
  // only an exclusive holder (a copy-rate measurement) refuses one.
  try {
    state->lease = DeviceLease(*state->device);
  } catch (...) {
    state->deferred->Reject(to_js_error(env, capture_exception(std::current_exception())).Value());
    return handle;
  }

  state->device_object = Napi::Persistent(info[0].As<Napi::Object>());
  state->model_object = Napi::Persistent(info[1].As<Napi::Object>());
  if (info[3].IsFunction()) state->on_step = Napi::Persistent(info[3].As<Napi::Function>());
  if (info[4].IsFunction()) state->on_handoff = Napi::Persistent(info[4].As<Napi::Function>());
  auto* holder = new std::shared_ptr<RunState>(state);
  try {
    // The callbacks are called through their references (deliver_message), not the channel's.
    state->channel = StepChannel::New(env, Napi::Function(), "ferry.run", 0, 1, state.get(),
                                      finalize_run, holder);
  } catch (...) {
    delete holder;
    state->lease.reset();
    throw;
  }
  // Registered after the channel, so it runs before the channel's own teardown hook.
  state->cleanup_hook.emplace(env.AddCleanupHook(on_env_teardown, state.get()));
  try {
    state->thread = std::thread(run_thread, state);
  } catch (const std::system_error& e) {
    // Without a thread nobody releases the channel; do it here so the finalizer settles the run.
    CapturedError error;
    error.message = std::string("could not start the run thread: ") + e.what();
    state->error = error;
    state->lease.reset();
    state->finished.store(true);
    state->channel.Release();
  }
  return handle;
}

}  // namespace addon
}  // namespace ferry
