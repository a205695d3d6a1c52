// oneDNN's batch normalization primitives (Debian's libdnnl 2.6, OpenMP
// runtime): forward_training with use_scale | use_shift, backward (diff_src,
// diff_scale, diff_shift), forward_inference with use_global_stats. Memory
// descriptors take the problem's strides, so NCHW and NHWC are oneDNN's plain
// nchw and nhwc formats. The note column names the implementation oneDNN
// picked (impl_info_str).
//
// Differences from PyTorch and normkit: oneDNN keeps no running statistics
// (forward-training outputs the batch mean and biased variance, backward takes
// the variance rather than invstd), which costs them nothing measurable:
// C values per call.
#include <omp.h>

#include <memory>
#include <string>
#include <unordered_map>

#include "harness.hpp"
#include "oneapi/dnnl/dnnl.hpp"

namespace normkit_bench {
namespace {

constexpr float kEps = 1e-5f;

using dnnl::memory;
using dnnl::normalization_flags;
using dnnl::prop_kind;

struct State {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{engine};
  dnnl::batch_normalization_forward forward, inference;
  dnnl::batch_normalization_backward backward;
  std::unordered_map<int, memory> forward_args, inference_args, backward_args;
  std::string forward_impl, inference_impl, backward_impl;
  const float* y = nullptr;
  const float* dx = nullptr;

  void run_forward() {
    forward.execute(stream, forward_args);
    stream.wait();
  }
  void run_backward() {
    backward.execute(stream, backward_args);
    stream.wait();
  }
  void run_inference() {
    inference.execute(stream, inference_args);
    stream.wait();
  }
};

std::vector<Case> batch_norm_cases(Data& data) {
  const Problem& p = data.problem;
  auto s = std::make_shared<State>();
  const memory::dims dims(p.sizes.begin(), p.sizes.end());
  const memory::dims strides_v = p.strides();
  const memory::desc data_md(dims, memory::data_type::f32, strides_v);
  const memory::desc channel_md({p.channels()}, memory::data_type::f32, memory::format_tag::a);
  const auto flags = normalization_flags::use_scale | normalization_flags::use_shift;

  const dnnl::batch_normalization_forward::primitive_desc forward_pd(
      {prop_kind::forward_training, data_md, kEps, flags}, s->engine);
  const dnnl::batch_normalization_forward::primitive_desc inference_pd(
      {prop_kind::forward_inference, data_md, kEps, flags | normalization_flags::use_global_stats},
      s->engine);
  const dnnl::batch_normalization_backward::primitive_desc backward_pd(
      {prop_kind::backward, data_md, data_md, kEps, flags}, s->engine, forward_pd);
  s->forward = dnnl::batch_normalization_forward(forward_pd);
  s->inference = dnnl::batch_normalization_forward(inference_pd);
  s->backward = dnnl::batch_normalization_backward(backward_pd);
  s->forward_impl = forward_pd.impl_info_str();
  s->inference_impl = inference_pd.impl_info_str();
  s->backward_impl = backward_pd.impl_info_str();

  const auto user = [&](const memory::desc& md, const Buffer& buffer) {
    return memory(md, s->engine, buffer.data());
  };
  const auto owned = [&](const memory::desc& md) { return memory(md, s->engine); };
  const memory x = user(data_md, data.x), y = user(data_md, data.y);
  const memory dy = user(data_md, data.dy), dx = user(data_md, data.dx);
  const memory scale = user(channel_md, data.gamma), shift = user(channel_md, data.beta);
  const memory mean = owned(channel_md), variance = owned(channel_md);
  const memory diff_scale = owned(channel_md), diff_shift = owned(channel_md);
  const memory running_mean = user(channel_md, data.running_mean);
  const memory running_var = user(channel_md, data.running_var);
  s->y = data.y.data();
  s->dx = data.dx.data();

  s->forward_args = {{DNNL_ARG_SRC, x},       {DNNL_ARG_DST, y},     {DNNL_ARG_SCALE, scale},
                     {DNNL_ARG_SHIFT, shift}, {DNNL_ARG_MEAN, mean}, {DNNL_ARG_VARIANCE, variance}};
  s->backward_args = {{DNNL_ARG_SRC, x},
                      {DNNL_ARG_DIFF_DST, dy},
                      {DNNL_ARG_MEAN, mean},
                      {DNNL_ARG_VARIANCE, variance},
                      {DNNL_ARG_SCALE, scale},
                      // oneDNN 2.6 refuses to run backward with use_shift
                      // unless the (unused) shift is passed too.
                      {DNNL_ARG_SHIFT, shift},
                      {DNNL_ARG_DIFF_SRC, dx},
                      {DNNL_ARG_DIFF_SCALE, diff_scale},
                      {DNNL_ARG_DIFF_SHIFT, diff_shift}};
  s->inference_args = {{DNNL_ARG_SRC, x},
                       {DNNL_ARG_DST, y},
                       {DNNL_ARG_SCALE, scale},
                       {DNNL_ARG_SHIFT, shift},
                       {DNNL_ARG_MEAN, running_mean},
                       {DNNL_ARG_VARIANCE, running_var}};
  s->run_forward();  // the statistics the backward case uses

  const auto out_y = [s] { return s->y; };
  const auto out_dx = [s] { return s->dx; };
  return {
      {"onednn", Op::forward_training, s->forward_impl, [s] { s->run_forward(); }, out_y},
      {"onednn", Op::backward, s->backward_impl, [s] { s->run_backward(); }, out_dx},
      {"onednn", Op::forward_backward,
       s->forward_impl == s->backward_impl ? s->forward_impl
                                           : s->forward_impl + " + " + s->backward_impl,
       [s] {
         s->run_forward();
         s->run_backward();
       },
       out_dx},
      {"onednn", Op::inference, s->inference_impl, [s] { s->run_inference(); }, out_y},
  };
}

std::string version_string() {
  const dnnl_version_t* v = dnnl_version();
  return std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch);
}

}  // namespace

Backend onednn_backend() {
  return {"onednn", version_string(),
          // The OpenMP runtime: oneDNN uses omp_get_max_threads() when a
          // primitive is created and run, so cases are built after this call.
          [](int threads) { omp_set_num_threads(threads); },
          [](Data& data) -> std::vector<Case> {
            const std::string& kind = data.problem.kind;
            if (kind == "bn1d" || kind == "bn2d" || kind == "bn3d") return batch_norm_cases(data);
            return {};
          }};
}

}  // namespace normkit_bench
