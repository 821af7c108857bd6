// Autograd of kd_reduce_fwd, registered in C++ for the Autograd key: a Python autograd function costs more per
// call than a small loss's whole kernel work (kd_div on 2 x 2 spent most of its time there). Forward and backward
// call the ops through the dispatcher below autograd, so their fake kernels (kdfast/logits.py) serve
// torch.compile. The gradients are not differentiable again: differentiating them (double backward) raises an
// error naming the public function, as kdfast._autograd.once_differentiable does for the Python-registered ops.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>

namespace kdfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Identity on a first-order gradient whose backward raises; its other inputs are the tensors the gradient was
// computed from, so that any second derivative through them reaches it.
struct NoSecondDerivative : torch::autograd::Function<NoSecondDerivative> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad, const std::string& name,
                            at::TensorList /*sources*/) {
    ctx->saved_data["name"] = name;
    return grad.view_as(grad);
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& /*grads*/) {
    TORCH_CHECK(false, "kdfast.", ctx->saved_data["name"].toStringRef(),
                " does not support double backward (differentiating its gradient, e.g. "
                "torch.autograd.grad(..., create_graph=True) then a second gradient): use the pure-PyTorch reference "
                "(kdfast.reference) or KDFAST_BACKEND=reference for higher-order derivatives");
  }
};

using FwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    int64_t, double, c10::string_view, double, int64_t, c10::string_view, double, double);
using BwdSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, int64_t, double, c10::string_view, double,
    int64_t, c10::string_view, double, double, bool, bool);

std::optional<at::Tensor> optional_of(const at::Tensor& x) {
  return x.defined() ? std::optional<at::Tensor>(x) : std::nullopt;
}

struct KdReduce : torch::autograd::Function<KdReduce> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                               const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& mask,
                               int64_t dim, double temperature, c10::string_view divergence, double beta,
                               int64_t ignore_index, c10::string_view reduction, double kd_weight, double ce_weight) {
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("kdfast::kd_reduce_fwd", "").typed<FwdSig>();
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, stats, count] = op.call(student, teacher, target, mask, dim, temperature, divergence, beta,
                                        ignore_index, reduction, kd_weight, ce_weight);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({student, teacher, target.value_or(at::Tensor()), mask.value_or(at::Tensor()), stats,
                            count});
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["divergence"] = std::string(divergence);
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["kd_weight"] = kd_weight;
    ctx->saved_data["ce_weight"] = ce_weight;
    ctx->mark_non_differentiable({stats, count});
    return {loss, stats, count};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    variable_list out(12);
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return out;
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("kdfast::kd_reduce_bwd", "").typed<BwdSig>();
    const variable_list saved = ctx->get_saved_variables();
    const bool need_s = ctx->needs_input_grad(0), need_t = ctx->needs_input_grad(1);
    const auto& d = ctx->saved_data;
    at::Tensor gs, gt;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(gs, gt) = op.call(grad, saved[0], saved[1], optional_of(saved[2]), optional_of(saved[3]), saved[4],
                                 saved[5], d.at("dim").toInt(), d.at("temperature").toDouble(),
                                 d.at("divergence").toStringRef(), d.at("beta").toDouble(),
                                 d.at("ignore_index").toInt(), d.at("reduction").toStringRef(),
                                 d.at("kd_weight").toDouble(), d.at("ce_weight").toDouble(), need_s, need_t);
    }
    if (at::GradMode::is_enabled()) {  // create_graph: mark the gradients as not differentiable again
      variable_list sources;
      for (const at::Tensor& x : {saved[0], saved[1], grad})
        if (x.requires_grad()) sources.push_back(x);
      if (!sources.empty()) {
        const std::string name = saved[2].defined() ? "kd_loss" : "kd_div";
        if (need_s) gs = NoSecondDerivative::apply(gs, name, at::TensorList(sources));
        if (need_t) gt = NoSecondDerivative::apply(gt, name, at::TensorList(sources));
      }
    }
    out[0] = need_s ? gs : at::Tensor();
    out[1] = need_t ? gt : at::Tensor();
    return out;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, Autograd, m) {
  m.impl("kd_reduce_fwd", [](const at::Tensor& s, const at::Tensor& t, const std::optional<at::Tensor>& y,
                             const std::optional<at::Tensor>& mask, int64_t dim, double T, c10::string_view d,
                             double beta, int64_t ignore, c10::string_view red, double kw, double cw) {
    const variable_list out = KdReduce::apply(s, t, y, mask, dim, T, d, beta, ignore, red, kw, cw);
    return std::make_tuple(out[0], out[1], out[2]);
  });
}

}  // namespace kdfast
