#include "attention.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <cmath>

#include "cpu/dispatch.h"
#include "tensor_utils.h"

namespace kdfast {
namespace {

Pool parse_pool(const std::string& pool) {
  if (pool == "mean") return Pool::Mean;
  if (pool == "sum") return Pool::Sum;
  if (pool == "max") return Pool::Max;
  TORCH_CHECK_VALUE(false, "kdfast: pool must be 'mean', 'sum' or 'max', got '", pool, "'");
}

// The features as contiguous (batch, channels, positions) tensors of kernel-readable dtypes, all float64 when
// any is (so that the call accumulates in float64), and the problem's shared fields.
std::vector<at::Tensor> prepare_features(const std::vector<at::Tensor>& features, double p, const std::string& pool,
                                         bool normalize, int64_t pairs, AttentionProblem& prob) {
  TORCH_CHECK_VALUE(!features.empty(), "kdfast: attention ops need at least one feature map");
  TORCH_CHECK_VALUE(std::isfinite(p) && p > 0, "kdfast: p must be finite and > 0, got ", p);
  TORCH_CHECK_VALUE(pairs == 0 || (normalize && int64_t(features.size()) == 2 * pairs),
                    "kdfast: attention transfer needs as many student as teacher feature maps");
  bool any_double = false;
  for (const at::Tensor& f : features) {
    TORCH_CHECK_VALUE(f.dim() == 3, "kdfast: attention ops take (batch, channels, positions) features, got ",
                      f.sizes());
    TORCH_CHECK_VALUE(f.size(0) == features[0].size(0), "kdfast: feature maps of batch ", f.size(0), " and ",
                      features[0].size(0));
    TORCH_CHECK_VALUE(f.size(1) >= 1, "kdfast: a feature map has no channels");
    // The kernels keep arg-max channels as int32 and compare them in float.
    TORCH_CHECK_VALUE(f.size(1) <= (int64_t(1) << 24), "kdfast: attention ops support at most 2^24 channels");
    TORCH_CHECK(f.device() == features[0].device(), "kdfast: feature maps on ", f.device(), " and ",
                features[0].device());
    kernel_dtype(f, "features");
    any_double = any_double || f.scalar_type() == at::kDouble;
  }
  for (int64_t k = 0; k < pairs; ++k)
    TORCH_CHECK_VALUE(features[k].size(2) == features[pairs + k].size(2), "kdfast: layer pair ", k, " has ",
                      features[k].size(2), " student and ", features[pairs + k].size(2), " teacher positions");
  std::vector<at::Tensor> xs;
  for (const at::Tensor& f : features) xs.push_back((any_double ? f.to(at::kDouble) : f).contiguous());
  prob = AttentionProblem{};
  prob.count = int64_t(xs.size());
  prob.batch = xs[0].size(0);
  prob.p = p;
  prob.pool = parse_pool(pool);
  prob.normalize = normalize;
  prob.acc_double = any_double;
  prob.pairs = pairs;
  return xs;
}

AttentionFeature describe(const at::Tensor& x) {
  AttentionFeature f{};
  f.x = x.data_ptr();
  f.dtype = kernel_dtype(x, "features");
  f.channels = x.size(1);
  f.positions = x.size(2);
  return f;
}

}  // namespace

std::vector<at::Tensor> concat(at::TensorList a, at::TensorList b) {
  std::vector<at::Tensor> all(a.begin(), a.end());
  all.insert(all.end(), b.begin(), b.end());
  return all;
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, std::vector<at::Tensor>> attention_forward_op(
    const std::vector<at::Tensor>& features, double p, const std::string& pool, bool normalize, int64_t pairs,
    const AttentionLauncher& launch) {
  AttentionProblem prob;
  const std::vector<at::Tensor> xs = prepare_features(features, p, pool, normalize, pairs, prob);
  const auto acc = xs[0].options().dtype(prob.acc_double ? at::kDouble : at::kFloat);
  std::vector<at::Tensor> maps, argmax;
  std::vector<AttentionFeature> desc;
  bool work = false;
  for (const at::Tensor& x : xs) {
    maps.push_back(at::empty({prob.batch, x.size(2)}, acc));
    argmax.push_back(prob.pool == Pool::Max ? at::empty({prob.batch, x.size(2)}, acc.dtype(at::kInt))
                                            : at::empty({0}, acc.dtype(at::kInt)));
    AttentionFeature f = describe(x);
    f.map = maps.back().data_ptr();
    f.argmax = prob.pool == Pool::Max ? argmax.back().data_ptr<int32_t>() : nullptr;
    desc.push_back(f);
    work = work || x.numel() > 0;
  }
  // norms are only computed with normalize; zeros otherwise rather than uninitialised memory
  at::Tensor norms = normalize ? at::empty({prob.count, prob.batch}, acc) : at::zeros({prob.count, prob.batch}, acc);
  // zeros: a call without elements (empty batch, or no positions) launches nothing and its rows are 0
  at::Tensor rows = pairs > 0 ? at::zeros({pairs, prob.batch}, acc) : at::empty({0}, acc);
  if (work) {
    prob.features = desc.data();
    prob.norms = norms.data_ptr();
    prob.rows = pairs > 0 ? rows.data_ptr() : nullptr;
    launch(prob);
  }
  return {rows, maps, norms, argmax};
}

std::vector<at::Tensor> attention_backward_op(at::TensorList grad_maps, const std::optional<at::Tensor>& grad_rows,
                                              const std::vector<at::Tensor>& features, at::TensorList maps,
                                              const at::Tensor& norms, at::TensorList argmax, double p,
                                              const std::string& pool, bool normalize, int64_t pairs,
                                              const std::vector<bool>& needs_grad, const AttentionLauncher& launch) {
  AttentionProblem prob;
  const std::vector<at::Tensor> xs = prepare_features(features, p, pool, normalize, pairs, prob);
  const size_t n = xs.size();
  TORCH_CHECK_VALUE((pairs > 0 || grad_maps.size() == n) && maps.size() == n && argmax.size() == n &&
                        needs_grad.size() == n,
                    "kdfast: attention backward needs one map, argmax, needs_grad (and grad_map) per feature");
  const auto acc = prob.acc_double ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(norms.sizes() == at::IntArrayRef({prob.count, prob.batch}) && norms.scalar_type() == acc,
                    "kdfast: norms of shape ", norms.sizes(), " do not belong to these features");
  const at::Tensor nm = norms.contiguous();
  at::Tensor gr;
  if (pairs > 0) {
    TORCH_CHECK_VALUE(grad_rows.has_value(), "kdfast: attention transfer backward needs grad_rows");
    gr = grad_rows->to(acc).expand({pairs, prob.batch}).contiguous();
  }
  std::vector<at::Tensor> keep, grads;  // keep: the converted inputs the problem points into
  std::vector<AttentionFeature> desc;
  bool work = false;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& x = xs[i];
    const std::array<int64_t, 2> shape{prob.batch, x.size(2)};
    TORCH_CHECK_VALUE(maps[i].sizes() == at::IntArrayRef(shape) && maps[i].scalar_type() == acc, "kdfast: map ", i,
                      " of shape ", maps[i].sizes(), " does not belong to its feature");
    TORCH_CHECK_VALUE(prob.pool != Pool::Max || (argmax[i].sizes() == at::IntArrayRef(shape) &&
                                                 argmax[i].scalar_type() == at::kInt),
                      "kdfast: argmax ", i, " of shape ", argmax[i].sizes(), " does not belong to its feature");
    AttentionFeature f = describe(x);
    keep.push_back(maps[i].contiguous());  // a transfer problem reads the partner's map too
    f.map = keep.back().data_ptr();
    if (needs_grad[i]) {
      if (pairs == 0) {
        keep.push_back(grad_maps[i].to(acc).expand(shape).contiguous());
        f.grad_map = keep.back().data_ptr();
      }
      if (prob.pool == Pool::Max) {
        keep.push_back(argmax[i].contiguous());
        f.argmax = keep.back().data_ptr<int32_t>();
      }
      grads.push_back(empty_output(x.sizes(), x.options()));
      f.grad = grads.back().data_ptr();
      work = work || x.numel() > 0;
    } else {
      grads.push_back(at::empty({0}, features[i].options()));
    }
    desc.push_back(f);
  }
  if (work) {
    prob.features = desc.data();
    prob.norms = const_cast<void*>(nm.data_ptr());
    prob.grad_rows = pairs > 0 ? gr.data_ptr() : nullptr;
    launch(prob);
  }
  // Gradients come back in the caller's dtypes, also where a float64 call promoted a feature.
  for (size_t i = 0; i < n; ++i)
    if (needs_grad[i]) grads[i] = grads[i].to(features[i].scalar_type());
  return grads;
}

TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  // Attention maps of every (batch, channels, positions) feature map of a call in one launch: pooled over the
  // channels as mean/sum/max of |x|^p and, with normalize, L2-normalised over the positions. maps are float32
  // (float64 when a feature is), norms the (features, batch) norms before normalisation, argmax the int32 first
  // arg-max channels for max pooling (empty otherwise). The backward writes each requested feature gradient once.
  m.def("attention_fwd(Tensor[] features, float p, str pool, bool normalize) "
        "-> (Tensor[] maps, Tensor norms, Tensor[] argmax)");
  m.def("attention_bwd(Tensor[] grad_maps, Tensor[] features, Tensor[] maps, Tensor norms, Tensor[] argmax, "
        "float p, str pool, bool normalize, bool[] needs_grad) -> Tensor[]");
  // Attention transfer over layer pairs (student[k], teacher[k]) of equal positions, in one launch each way:
  // rows = the (pairs, batch) per-sample means over positions of (map_s - map_t)^2 of normalised maps; maps, norms
  // and argmax as attention_fwd over student + teacher (saved for the backward). The backward returns the
  // gradients of student + teacher (empty where needs_grad, over the same concatenation, is false).
  m.def("attention_transfer_fwd(Tensor[] student, Tensor[] teacher, float p, str pool) "
        "-> (Tensor rows, Tensor[] maps, Tensor norms, Tensor[] argmax)");
  m.def("attention_transfer_bwd(Tensor grad_rows, Tensor[] student, Tensor[] teacher, Tensor[] maps, Tensor norms, "
        "Tensor[] argmax, float p, str pool, bool[] needs_grad) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("attention_fwd", [](at::TensorList features, double p, c10::string_view pool, bool normalize) {
    auto [rows, maps, norms, argmax] =
        attention_forward_op(features.vec(), p, std::string(pool), normalize, 0, cpu::attention_forward);
    return std::make_tuple(maps, norms, argmax);
  });
  m.impl("attention_bwd", [](at::TensorList grad_maps, at::TensorList features, at::TensorList maps,
                             const at::Tensor& norms, at::TensorList argmax, double p, c10::string_view pool,
                             bool normalize, const c10::List<bool>& needs_grad) {
    return attention_backward_op(grad_maps, std::nullopt, features.vec(), maps, norms, argmax, p, std::string(pool),
                                 normalize, 0, needs_grad.vec(), cpu::attention_backward);
  });
  m.impl("attention_transfer_fwd", [](at::TensorList student, at::TensorList teacher, double p,
                                      c10::string_view pool) {
    TORCH_CHECK_VALUE(student.size() == teacher.size(), "kdfast: ", student.size(), " student and ", teacher.size(),
                      " teacher feature maps");
    return attention_forward_op(concat(student, teacher), p, std::string(pool), true, int64_t(student.size()),
                                cpu::attention_forward);
  });
  m.impl("attention_transfer_bwd", [](const at::Tensor& grad_rows, at::TensorList student, at::TensorList teacher,
                                      at::TensorList maps, const at::Tensor& norms, at::TensorList argmax, double p,
                                      c10::string_view pool, const c10::List<bool>& needs_grad) {
    TORCH_CHECK_VALUE(student.size() == teacher.size(), "kdfast: ", student.size(), " student and ", teacher.size(),
                      " teacher feature maps");
    return attention_backward_op({}, grad_rows, concat(student, teacher), maps, norms, argmax, p, std::string(pool),
                                 true, int64_t(student.size()), needs_grad.vec(), cpu::attention_backward);
  });
}

}  // namespace kdfast
