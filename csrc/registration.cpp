// Every canet op schema, in one place. Backends only add TORCH_LIBRARY_IMPL.
//
// Layout shared by all ops: a batch of B samples is packed varlen, x[T, D]
// holds the tokens of sample b in rows cu_seqlens[b] .. cu_seqlens[b+1].
// Sample b runs at its own width widths[b] <= D: it reads x[:, :w_b], uses
// the leading block W[:out, :in] of every shared weight, and its output is
// zero beyond its width. Heads split the leading w_b features: head i owns
// features [i*w_b/h, (i+1)*w_b/h).
//
// Ops with saved activations come as `<op>_fwd` (returns the output plus what
// backward needs) and `<op>_backward`; the public `<op>` returns only the
// output and is CompositeImplicitAutograd over `<op>_fwd`, so autograd and
// torch.compile see the fwd/backward pair.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include <initializer_list>

namespace canet {

namespace {

// Whether a backward pass can follow: only then does `<op>_fwd` need to
// write what backward reads (inference skips it).
bool needs_saved(std::initializer_list<const at::Tensor*> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : inputs)
    if (t->requires_grad()) return true;
  return false;
}

at::Tensor sliced_attention(const at::Tensor& x, const at::Tensor& cu_seqlens,
                            const at::Tensor& widths, const at::Tensor& w_qkv,
                            const at::Tensor& b_qkv, const at::Tensor& w_o,
                            const at::Tensor& b_o, int64_t num_heads,
                            bool causal) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("canet::sliced_attention_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor,
                                         at::Tensor>(
                           const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, int64_t, bool, bool)>();
  const bool save = needs_saved({&x, &w_qkv, &b_qkv, &w_o, &b_o});
  return std::get<0>(op.call(x, cu_seqlens, widths, w_qkv, b_qkv, w_o, b_o,
                             num_heads, causal, save));
}

at::Tensor sliced_ffn(const at::Tensor& x, const at::Tensor& cu_seqlens,
                      const at::Tensor& widths, const at::Tensor& w1,
                      const at::Tensor& b1, const at::Tensor& w2,
                      const at::Tensor& b2, int64_t ratio) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("canet::sliced_ffn_fwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, int64_t, bool)>();
  const bool save = needs_saved({&x, &w1, &b1, &w2, &b2});
  return std::get<0>(
      op.call(x, cu_seqlens, widths, w1, b1, w2, b2, ratio, save));
}

at::Tensor sliced_add_layernorm(const at::Tensor& x, const at::Tensor& residual,
                                const at::Tensor& cu_seqlens,
                                const at::Tensor& widths,
                                const at::Tensor& weight,
                                const at::Tensor& bias, double eps) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("canet::sliced_add_layernorm_fwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const at::Tensor&,
              double)>();
  return std::get<0>(
      op.call(x, residual, cu_seqlens, widths, weight, bias, eps));
}

}  // namespace

TORCH_LIBRARY(canet, m) {
  // y[t, :o_b] = x[t, :i_b] @ weight[:o_b, :i_b]^T + bias[:o_b]; zero beyond o_b.
  m.def(
      "sliced_linear(Tensor x, Tensor cu_seqlens, Tensor in_widths, "
      "Tensor out_widths, Tensor weight, Tensor? bias) -> Tensor");
  m.def(
      "sliced_linear_backward(Tensor grad_out, Tensor x, Tensor cu_seqlens, "
      "Tensor in_widths, Tensor out_widths, Tensor weight, bool has_bias) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");

  // Self-attention sublayer: Q/K/V = x[:, :w] @ w_qkv[i, :w, :w]^T + b_qkv[i, :w],
  // softmax over the sample's own tokens (scale 1/sqrt(w/h)), then w_o.
  // qkv[T, 3, D] and ctx[T, D] (pre-projection) and lse[T, H] are saved; with
  // save_activations=false (inference) all three come back with 0 rows.
  m.def(
      "sliced_attention(Tensor x, Tensor cu_seqlens, Tensor widths, "
      "Tensor w_qkv, Tensor b_qkv, Tensor w_o, Tensor b_o, int num_heads, "
      "bool causal=True) -> Tensor");
  m.def(
      "sliced_attention_fwd(Tensor x, Tensor cu_seqlens, Tensor widths, "
      "Tensor w_qkv, Tensor b_qkv, Tensor w_o, Tensor b_o, int num_heads, "
      "bool causal=True, bool save_activations=True) -> (Tensor out, Tensor qkv, "
      "Tensor ctx, Tensor lse)");
  m.def(
      "sliced_attention_backward(Tensor grad_out, Tensor x, Tensor cu_seqlens, "
      "Tensor widths, Tensor w_qkv, Tensor w_o, Tensor qkv, Tensor ctx, "
      "Tensor lse, int num_heads, bool causal) -> (Tensor grad_x, "
      "Tensor grad_w_qkv, Tensor grad_b_qkv, Tensor grad_w_o, Tensor grad_b_o)");

  // FFN sublayer: gelu(x[:, :w] @ w1[:r*w, :w]^T + b1[:r*w]) @ w2[:w, :r*w]^T + b2[:w].
  // The pre-activation hidden[T, w1.size(0)] is saved for backward; with
  // save_hidden=false (inference) hidden is [0, w1.size(0)].
  m.def(
      "sliced_ffn(Tensor x, Tensor cu_seqlens, Tensor widths, Tensor w1, "
      "Tensor b1, Tensor w2, Tensor b2, int ratio=4) -> Tensor");
  m.def(
      "sliced_ffn_fwd(Tensor x, Tensor cu_seqlens, Tensor widths, Tensor w1, "
      "Tensor b1, Tensor w2, Tensor b2, int ratio=4, bool save_hidden=True) "
      "-> (Tensor out, Tensor hidden)");
  m.def(
      "sliced_ffn_backward(Tensor grad_out, Tensor x, Tensor cu_seqlens, "
      "Tensor widths, Tensor w1, Tensor w2, Tensor hidden, int ratio) -> "
      "(Tensor grad_x, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, "
      "Tensor grad_b2)");

  // LayerNorm(x + residual) over each token's first w features, zero beyond.
  m.def(
      "sliced_add_layernorm(Tensor x, Tensor residual, Tensor cu_seqlens, "
      "Tensor widths, Tensor weight, Tensor bias, float eps=1e-5) -> Tensor");
  m.def(
      "sliced_add_layernorm_fwd(Tensor x, Tensor residual, Tensor cu_seqlens, "
      "Tensor widths, Tensor weight, Tensor bias, float eps=1e-5) -> "
      "(Tensor out, Tensor mean, Tensor rstd)");
  m.def(
      "sliced_add_layernorm_backward(Tensor grad_out, Tensor x, "
      "Tensor residual, Tensor cu_seqlens, Tensor widths, Tensor weight, "
      "Tensor mean, Tensor rstd) -> (Tensor grad_input, Tensor grad_weight, "
      "Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(canet, CompositeImplicitAutograd, m) {
  m.impl("sliced_attention", TORCH_FN(sliced_attention));
  m.impl("sliced_ffn", TORCH_FN(sliced_ffn));
  m.impl("sliced_add_layernorm", TORCH_FN(sliced_add_layernorm));
}

}  // namespace canet

// ------------------------------------------------------- routed scoring ----
// Scoring rows against an item table without the [rows, items] logit tensor.
// Row i of h[N, D] runs at width widths[i] (one entry per row, not per
// sample): its logits are logits[i, v] = h[i, :w_i] . weight[v, :w_i] +
// bias[v] over all V items of weight[V, >= max width]. Backends work through
// the items in chunks of at most `chunk_size` (the CPU kernel's unit of work,
// smaller on short tables so that threads share it; Triton picks its own
// tiles), so memory is O(N * chunk + V * D), never O(N * V). CPU results depend
// on the chunking, not on the thread count. On CUDA, values that would need
// a host sync (widths, target and exclude ids) are not checked.
//
// sliced_linear_cross_entropy: mean over the rows whose target is neither
// negative nor ignore_index of logsumexp(logits[i]) - logits[i, targets[i]];
// 0 (with zero gradients) when every row is ignored. `_fwd` also returns
// lse[N], each row's log-sum-exp (0 for ignored rows), which `_backward`
// uses to recompute the softmax chunk by chunk. The loss and lse are fp32
// for 16-bit inputs.
//
// sliced_linear_topk: the k best items of each row, best first, in the total
// order (score descending, item index ascending): equal scores list the
// lower index first on every backend. exclude [N, M] or [1, M] (one row of
// ids for every row) lists item ids scored -inf for that row, padded with
// negative ids; exclude the padding item 0 with a column of zeros. Excluded
// items still rank (last) when fewer than k items remain.
namespace canet {
namespace {

at::Tensor sliced_linear_cross_entropy(const at::Tensor& h,
                                       const at::Tensor& widths,
                                       const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias,
                                       const at::Tensor& targets,
                                       int64_t ignore_index,
                                       int64_t chunk_size) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("canet::sliced_linear_cross_entropy_fwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, const at::Tensor&, int64_t,
              int64_t)>();
  return std::get<0>(
      op.call(h, widths, weight, bias, targets, ignore_index, chunk_size));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(canet, m) {
  m.def(
      "sliced_linear_cross_entropy(Tensor h, Tensor widths, Tensor weight, "
      "Tensor? bias, Tensor targets, int ignore_index=-100, "
      "int chunk_size=4096) -> Tensor");
  m.def(
      "sliced_linear_cross_entropy_fwd(Tensor h, Tensor widths, "
      "Tensor weight, Tensor? bias, Tensor targets, int ignore_index=-100, "
      "int chunk_size=4096) -> (Tensor loss, Tensor lse)");
  m.def(
      "sliced_linear_cross_entropy_backward(Tensor grad_loss, Tensor h, "
      "Tensor widths, Tensor weight, Tensor? bias, Tensor targets, "
      "Tensor lse, int ignore_index, int chunk_size) -> (Tensor grad_h, "
      "Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "sliced_linear_topk(Tensor h, Tensor widths, Tensor weight, "
      "Tensor? bias, int k, int chunk_size=4096, Tensor? exclude=None) -> "
      "(Tensor values, Tensor indices)");
}

TORCH_LIBRARY_IMPL(canet, CompositeImplicitAutograd, m) {
  m.impl("sliced_linear_cross_entropy", TORCH_FN(sliced_linear_cross_entropy));
}

}  // namespace canet
