// Self-attention sublayer at per-sample width, on the CPU.
// Projections: one BLAS call per run of equal-width samples and per Q/K/V/O.
// Attention core: one task per (sample, head), softmax in fp32 (fp64 for
// fp64), inner loops laid out to vectorize over keys or features.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <limits>
#include <string>

#include "common.h"
#include "cpu/vec_math.h"

namespace canet {
namespace {

constexpr const char* kOp = "sliced_attention";

struct Task {
  int64_t row0, n, head, hd;
};

// Consecutive samples with equal width and length: a batch of equal-shape
// attention problems. Large ones go to ATen's CPU flash attention as one call
// (blocked GEMMs, vectorized softmax); the rest, typically the scattered
// lengths of real data, to the per-(sample, head) kernel below, which needs
// no padding.
struct Group {
  int64_t row0, count, n, w;
};
constexpr int64_t kMinFlashProblems = 8;  // samples x heads per library call

struct Checked {
  Routes routes;
  std::vector<Run> runs;
  std::vector<Task> tasks;
  std::vector<Group> groups;
};

Checked check(const at::Tensor& x, const at::Tensor& cu_seqlens,
              const at::Tensor& widths, const at::Tensor& w_qkv,
              const at::Tensor& w_o, int64_t num_heads) {
  check_float(x, kOp, "x");
  TORCH_CHECK_VALUE(x.dim() == 2, "canet.sliced_attention: x must be [T, D], "
                    "got shape ", x.sizes());
  TORCH_CHECK_VALUE(num_heads >= 1, "canet.sliced_attention: num_heads must be "
                    ">= 1, got ", num_heads);
  const int64_t D = x.size(1);
  check_like(w_qkv, x, kOp, "w_qkv", {3, D, D});
  check_like(w_o, x, kOp, "w_o", {D, D});
  Checked c;
  c.routes = check_routes(x, cu_seqlens, widths, D, kOp, "widths", num_heads,
                          "num_heads");
  c.runs = make_runs(c.routes);
  std::vector<Group> all;
  for (int64_t b = 0; b < c.routes.samples(); ++b) {
    const int64_t n = c.routes.cu[b + 1] - c.routes.cu[b], w = c.routes.width[b];
    if (n == 0) continue;
    if (!all.empty() && all.back().n == n && all.back().w == w &&
        all.back().row0 + all.back().count * n == c.routes.cu[b]) {
      ++all.back().count;
    } else {
      all.push_back({c.routes.cu[b], 1, n, w});
    }
  }
  for (const Group& g : all) {
    if (g.count * num_heads >= kMinFlashProblems) {
      c.groups.push_back(g);
      continue;
    }
    for (int64_t i = 0; i < g.count; ++i)
      for (int64_t h = 0; h < num_heads; ++h)
        c.tasks.push_back({g.row0 + i * g.n, g.n, h, g.w / num_heads});
  }
  return c;
}


constexpr int64_t kLane = 8;  // pad key and feature loops to whole vectors
inline int64_t round_up(int64_t v) { return (v + kLane - 1) / kLane * kLane; }

// One (sample, head) in acc_t, rows padded to np keys and hp features with
// zeros, so every inner loop runs whole vectors and has no scalar remainder
// (sequences are short: 1-200 tokens, head dims 10-32).
template <typename acc_t>
struct Head {
  int64_t n = 0, hd = 0, np = 0, hp = 0;
  std::vector<acc_t> q, k, v, kt, vt, o, dout, dq, dk, dv, p, dp, di;

  void reset(const Task& t, bool backward) {
    n = t.n, hd = t.hd, np = round_up(n), hp = round_up(hd);
    // q and o hold np rows (whole query tiles), p a tile of score rows.
    for (auto* b : {&q, &o}) b->assign(np * hp, acc_t(0));
    for (auto* b : {&k, &v}) b->assign(n * hp, acc_t(0));
    kt.assign(hd * np, acc_t(0));
    p.assign(4 * np, acc_t(0));
    if (backward) {
      for (auto* b : {&dout, &dq, &dk, &dv}) b->assign(n * hp, acc_t(0));
      vt.assign(hd * np, acc_t(0));
      dp.assign(np, acc_t(0));
      di.assign(n, acc_t(0));
    }
  }

  // Rows of one head's columns into `dst` [n, hp] (and `t` [hd, np]).
  template <typename scalar_t>
  void load(const scalar_t* base, int64_t stride, const Task& task,
            std::vector<acc_t>& dst, std::vector<acc_t>* t = nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t* row = base + (task.row0 + i) * stride + task.head * hd;
      for (int64_t c = 0; c < hd; ++c) {
        dst[i * hp + c] = acc_t(row[c]);
        if (t) (*t)[c * np + i] = acc_t(row[c]);
      }
    }
  }

  template <typename scalar_t>
  void store(scalar_t* base, int64_t stride, const Task& task,
             const std::vector<acc_t>& src) const {
    for (int64_t i = 0; i < n; ++i) {
      scalar_t* row = base + (task.row0 + i) * stride + task.head * hd;
      for (int64_t c = 0; c < hd; ++c) row[c] = scalar_t(src[i * hp + c]);
    }
  }

  // out[j] = scale * a . t[:, j] for j < le (t is K^T or V^T).
  void dots(const acc_t* a, const std::vector<acc_t>& t, int64_t le,
            acc_t scale, acc_t* out) const {
    for (int64_t j = 0; j < le; ++j) out[j] = 0;
    for (int64_t c = 0; c < hd; ++c) {
      const acc_t ac = a[c] * scale;
      const acc_t* tr = t.data() + c * np;
#pragma omp simd
      for (int64_t j = 0; j < le; ++j) out[j] += ac * tr[j];
    }
  }
};

// s[j] = exp(s[j] - m) for the lim visible keys, 0 for the padding up to le.
// Kept as a plain map so it vectorizes.
template <typename acc_t>
void softmax_numerators(acc_t* s, int64_t lim, int64_t le, acc_t m) {
#pragma omp simd
  for (int64_t j = 0; j < le; ++j) s[j] = exp_nonpos(std::min(s[j] - m, acc_t(0)));
  for (int64_t j = lim; j < le; ++j) s[j] = 0;
}

// Keys a query sees: lim real ones, le = lim rounded up to a whole vector.
inline void key_range(int64_t i, int64_t n, int64_t np, bool causal,
                      int64_t& lim, int64_t& le) {
  lim = causal ? i + 1 : n;
  le = std::min(round_up(lim), np);
}

// A register tile of kRows queries: each K^T / V load feeds kRows FMAs.
constexpr int64_t kRows = 4;

template <typename T>
struct Vec {
  static constexpr int64_t kN = 32 / sizeof(T);  // one 256-bit register
  typedef T type __attribute__((vector_size(32)));
  static type load(const T* p) {
    type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(T* p, type v) { std::memcpy(p, &v, sizeof(v)); }
};

// One (sample, head) forward: Q, K, V rows at `qkv` + row * qstride (K at
// + k_off, V at + v_off columns), output rows at `ctx` + row * cstride, the
// log-sum-exp at lse[row * H + head] unless lse is null.
template <typename scalar_t, typename acc_t>
void head_fwd(Head<acc_t>& h, const Task& task, const scalar_t* qkv, int64_t qstride,
              int64_t k_off, int64_t v_off, scalar_t* ctx, int64_t cstride,
              acc_t* lse, int64_t H, bool causal) {
  using V = Vec<acc_t>;
  using vec = typename V::type;
  h.reset(task, false);
  h.load(qkv, qstride, task, h.q);
  h.load(qkv + k_off, qstride, task, h.k, &h.kt);
  h.load(qkv + v_off, qstride, task, h.v);
  const acc_t scale = acc_t(1) / std::sqrt(acc_t(h.hd));
  const int64_t n = h.n, np = h.np, hp = h.hp, hd = h.hd;
  acc_t* S = h.p.data();  // kRows x np scores, then probabilities
  for (int64_t i0 = 0; i0 < n; i0 += kRows) {
    const int64_t rows = std::min(kRows, n - i0);
    // Keys the tile needs: up to the last row's causal limit.
    const int64_t lim_blk = causal ? i0 + rows : n;
    const int64_t le_blk = std::min(round_up(lim_blk), np);
    for (int64_t j = 0; j < le_blk; j += V::kN) {
      vec acc[kRows] = {};
      for (int64_t c = 0; c < hd; ++c) {
        const vec kv = V::load(&h.kt[c * np + j]);
#pragma GCC unroll 4
        for (int64_t r = 0; r < kRows; ++r) acc[r] += kv * h.q[(i0 + r) * hp + c];
      }
#pragma GCC unroll 4
      for (int64_t r = 0; r < kRows; ++r) V::store(&S[r * np + j], acc[r] * scale);
    }
    acc_t inv[kRows];
    for (int64_t r = 0; r < rows; ++r) {
      acc_t* s = S + r * np;
      const int64_t lim = causal ? i0 + r + 1 : n;
      acc_t m = -std::numeric_limits<acc_t>::infinity();
      for (int64_t j = 0; j < lim; ++j) m = std::max(m, s[j]);
      softmax_numerators(s, lim, le_blk, m);
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < le_blk; ++j) sum += s[j];
      inv[r] = acc_t(1) / sum;
      if (lse) lse[(task.row0 + i0 + r) * H + task.head] = m + std::log(sum);
    }
    for (int64_t r = rows; r < kRows; ++r) {  // padding rows of the tile
      std::fill(S + r * np, S + r * np + le_blk, acc_t(0));
      inv[r] = 0;
    }
    for (int64_t c = 0; c < hp; c += V::kN) {
      vec acc[kRows] = {};
      for (int64_t j = 0; j < lim_blk; ++j) {
        const vec vv = V::load(&h.v[j * hp + c]);
#pragma GCC unroll 4
        for (int64_t r = 0; r < kRows; ++r) acc[r] += vv * S[r * np + j];
      }
      for (int64_t r = 0; r < rows; ++r) V::store(&h.o[(i0 + r) * hp + c], acc[r] * inv[r]);
    }
  }
  h.store(ctx, cstride, task, h.o);
}

template <typename scalar_t>
void attention_fwd(const at::Tensor& qkv, at::Tensor& ctx, at::Tensor& lse,
                   const std::vector<Task>& tasks, int64_t H, bool causal) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = ctx.size(1);
  const scalar_t* pqkv = qkv.data_ptr<scalar_t>();
  scalar_t* pctx = ctx.data_ptr<scalar_t>();
  acc_t* plse = lse.data_ptr<acc_t>();
  at::parallel_for(0, tasks.size(), 1, [&](int64_t a, int64_t z) {
    Head<acc_t> h;
    for (int64_t ti = a; ti < z; ++ti)
      head_fwd(h, tasks[ti], pqkv, 3 * D, D, 2 * D, pctx, D, plse, H, causal);
  });
}

template <typename scalar_t>
void attention_bwd(const at::Tensor& qkv, const at::Tensor& ctx,
                   const at::Tensor& dctx, const at::Tensor& lse,
                   at::Tensor& dqkv, const std::vector<Task>& tasks, int64_t H,
                   bool causal) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = ctx.size(1);
  const scalar_t *pqkv = qkv.data_ptr<scalar_t>(), *pctx = ctx.data_ptr<scalar_t>();
  const scalar_t* pd = dctx.data_ptr<scalar_t>();
  const acc_t* plse = lse.data_ptr<acc_t>();
  scalar_t* pg = dqkv.data_ptr<scalar_t>();
  at::parallel_for(0, tasks.size(), 1, [&](int64_t a, int64_t z) {
    Head<acc_t> h;
    for (int64_t ti = a; ti < z; ++ti) {
      const Task& task = tasks[ti];
      h.reset(task, true);
      h.load(pqkv, 3 * D, task, h.q);
      h.load(pqkv + D, 3 * D, task, h.k, &h.kt);
      h.load(pqkv + 2 * D, 3 * D, task, h.v, &h.vt);
      h.load(pctx, D, task, h.o);
      h.load(pd, D, task, h.dout);
      const acc_t scale = acc_t(1) / std::sqrt(acc_t(h.hd));
      const int64_t hp = h.hp;
      for (int64_t i = 0; i < h.n; ++i) {
        acc_t d = 0;
        for (int64_t c = 0; c < hp; ++c) d += h.dout[i * hp + c] * h.o[i * hp + c];
        h.di[i] = d;
      }
      acc_t *p = h.p.data(), *dp = h.dp.data();
      for (int64_t i = 0; i < h.n; ++i) {
        int64_t lim, le;
        key_range(i, h.n, h.np, causal, lim, le);
        const acc_t l = plse[(task.row0 + i) * H + task.head];
        const acc_t *qi = &h.q[i * hp], *doi = &h.dout[i * hp];
        h.dots(qi, h.kt, le, scale, p);
        softmax_numerators(p, lim, le, l);
        h.dots(doi, h.vt, le, acc_t(1), dp);
        acc_t* dq = &h.dq[i * hp];
        for (int64_t j = 0; j < lim; ++j) {
          const acc_t ds = p[j] * (dp[j] - h.di[i]) * scale;
          const acc_t pj = p[j];
          const acc_t* kr = &h.k[j * hp];
          acc_t *dk = &h.dk[j * hp], *dv = &h.dv[j * hp];
#pragma omp simd
          for (int64_t c = 0; c < hp; ++c) {
            dq[c] += ds * kr[c];
            dk[c] += ds * qi[c];
            dv[c] += pj * doi[c];
          }
        }
      }
      h.store(pg, 3 * D, task, h.dq);
      h.store(pg + D, 3 * D, task, h.dk);
      h.store(pg + 2 * D, 3 * D, task, h.dv);
    }
  });
}

// [G, n, H, hd] -> [G, H, n, hd] view of a group's rows in a [T, k, D]
// buffer (k = 3 for qkv: `part` picks Q, K or V) or a [T, D] buffer.
at::Tensor head_view(const at::Tensor& t, const Group& g, int64_t H,
                     int64_t part = -1) {
  auto rows = t.slice(0, g.row0, g.row0 + g.count * g.n);
  if (part >= 0) rows = rows.select(1, part);
  return rows.slice(1, 0, g.w).view({g.count, g.n, H, g.w / H}).transpose(1, 2);
}

at::Tensor lse_view(const at::Tensor& lse, const Group& g, int64_t H) {
  return lse.slice(0, g.row0, g.row0 + g.count * g.n).view({g.count, g.n, H})
      .transpose(1, 2);  // [G, H, n]
}

// Runs fn(i) for every group, the groups spread over the threads, largest
// first: ATen's flash attention parallelises one call of 50-token sequences
// poorly (about 1.2x on 2 threads), while independent groups scale.
template <typename F>
void for_each_group(const std::vector<Group>& groups, const F& fn) {
  const int64_t n = static_cast<int64_t>(groups.size());
  const auto order = largest_first(n, [&](int64_t i) {
    return groups[i].count * groups[i].n * groups[i].n * groups[i].w;
  });
  parallel_items(n, [&](const auto& take) {
    for (int64_t k = take(); k >= 0; k = take()) fn(order[k]);
  });
}

// Groups through ATen's flash attention (training): the output is copied
// into ctx and the log-sum-exp into lse, both saved for backward.
void flash_fwd(const at::Tensor& qkv, at::Tensor& ctx, at::Tensor& lse,
               const std::vector<Group>& groups, int64_t H, bool causal) {
  for_each_group(groups, [&](int64_t i) {
    const Group& g = groups[i];
    const double scale = 1.0 / std::sqrt(double(g.w / H));
    auto [o, l] = at::_scaled_dot_product_flash_attention_for_cpu(
        head_view(qkv, g, H, 0), head_view(qkv, g, H, 1),
        head_view(qkv, g, H, 2), 0.0, causal, std::nullopt, scale);
    head_view(ctx, g, H).copy_(o);
    lse_view(lse, g, H).copy_(l);
  });
}

// Rows per chunk of the fused inference path: a chunk's x rows, its Q/K/V
// (rows x 3w) and the attention output stay in a core's L2 from the first
// GEMM to the last.
constexpr int64_t kChunkRows = 384;
// Smallest group that runs fused in inference.
constexpr int64_t kMinFusedRows = 256;

// Inference on the groups, the whole sublayer per chunk of a group's
// samples: one GEMM for Q, K and V side by side into a per-thread buffer,
// the attention core on views of it (see own_core below), the output projection straight
// from the library's output into `out`. Nothing of size T x 3D goes through
// memory (the CPU kernels are bandwidth-bound on 2 cores: the staged path
// writes and rereads qkv[T, 3, D]), and chunks spread over the threads.
void fused_groups_fwd(const at::Tensor& x, const at::Tensor& w_qkv,
                      const at::Tensor& b_qkv, const at::Tensor& w_o,
                      const at::Tensor& b_o, const std::vector<Group>& groups,
                      int64_t H, bool causal, at::Tensor& out) {
  std::vector<Group> chunks;  // a group's samples in chunks of ~kChunkRows rows
  std::vector<int64_t> widths;
  int64_t max_rows = 0;
  for (const Group& g : groups) {
    const int64_t per = std::max<int64_t>(1, kChunkRows / g.n);
    for (int64_t i = 0; i < g.count; i += per) {
      const int64_t c = std::min(per, g.count - i);
      chunks.push_back({g.row0 + i * g.n, c, g.n, g.w});
      max_rows = std::max(max_rows, c * g.n);
    }
    if (std::find(widths.begin(), widths.end(), g.w) == widths.end())
      widths.push_back(g.w);
  }
  // Q, K, V weights of each width stacked [3w, w]: one GEMM instead of three.
  std::vector<at::Tensor> w3(widths.size()), b3(widths.size());
  for (size_t i = 0; i < widths.size(); ++i) {
    const int64_t w = widths[i];
    w3[i] = w_qkv.slice(1, 0, w).slice(2, 0, w).reshape({3 * w, w});
    b3[i] = b_qkv.slice(1, 0, w).reshape({3 * w});
  }
  const int64_t D = x.size(1);
  const int64_t n = static_cast<int64_t>(chunks.size());
  // The attention core of a chunk: ATen's flash attention is ~1.2x faster
  // than the per-(sample, head) kernel on one thread, but two calls running
  // in two threads slow each other ~1.5x (not so in two processes), so when
  // the chunks spread over threads they take the per-head kernel (256 x 50
  // tokens, widths 64-128: 0.95 vs 1.06 x the FLOP ratio on 2 threads); run
  // one after another, each flash call uses every thread itself.
  // CANET_CPU_FUSED_CORE=flash|own overrides, for measuring.
  const bool own_core = [n] {
    const char* e = std::getenv("CANET_CPU_FUSED_CORE");
    if (e && std::string(e) == "flash") return false;
    if (e && std::string(e) == "own") return true;
    return items_in_parallel(n);
  }();
  auto run_chunk = [&](const Group& ch, at::Tensor& local, at::Tensor& local_ctx) {
    const int64_t w = ch.w, hd = w / H, rows = ch.count * ch.n;
    const size_t wi = std::find(widths.begin(), widths.end(), w) - widths.begin();
    auto qkv = local.view(-1).slice(0, 0, rows * 3 * w).view({rows, 3 * w});
    addmm_into(qkv, b3[wi], x.slice(0, ch.row0, ch.row0 + rows).slice(1, 0, w),
               w3[wi].t());
    at::Tensor ctx;
    if (own_core) {
      ctx = local_ctx.view(-1).slice(0, 0, rows * w).view({rows, w});
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                      "sliced_attention_fused", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        Head<acc_t> h;
        const scalar_t* q = qkv.data_ptr<scalar_t>();
        scalar_t* o = ctx.data_ptr<scalar_t>();
        for (int64_t s = 0; s < ch.count; ++s)
          for (int64_t head = 0; head < H; ++head)
            head_fwd<scalar_t, acc_t>(h, Task{s * ch.n, ch.n, head, hd}, q, 3 * w, w,
                                      2 * w, o, w, nullptr, H, causal);
      });
    } else {
      auto v5 = qkv.view({ch.count, ch.n, 3, H, hd});
      auto [o, l] = at::_scaled_dot_product_flash_attention_for_cpu(
          v5.select(2, 0).transpose(1, 2), v5.select(2, 1).transpose(1, 2),
          v5.select(2, 2).transpose(1, 2), 0.0, causal, std::nullopt,
          1.0 / std::sqrt(double(hd)));
      ctx = o.transpose(1, 2).reshape({rows, w});  // a view: [c, n, H, hd] memory
    }
    addmm_into(out.slice(0, ch.row0, ch.row0 + rows).slice(1, 0, w),
               b_o.slice(0, 0, w), ctx, w_o.slice(0, 0, w).slice(1, 0, w).t());
  };
  const auto order = largest_first(n, [&](int64_t i) {
    const Group& c = chunks[i];
    return c.count * c.n * c.w * (c.n + 12 * c.w);
  });
  parallel_items(n, [&](const auto& take) {
    auto local = at::empty({max_rows * 3 * D}, x.options());
    auto local_ctx = at::empty({max_rows * D}, x.options());
    for (int64_t k = take(); k >= 0; k = take())
      run_chunk(chunks[order[k]], local, local_ctx);
  });
}

// The stretches of each run's rows that no group covers (the scattered
// samples), as runs.
std::vector<Run> outside_groups(const std::vector<Run>& runs,
                                const std::vector<Group>& groups) {
  std::vector<Run> out;
  size_t gi = 0;
  for (const Run& r : runs) {
    int64_t row = r.row0;
    // groups are ordered by rows and never straddle a run
    while (gi < groups.size() && groups[gi].row0 < r.row1) {
      const Group& g = groups[gi++];
      if (g.row0 > row) out.push_back({row, g.row0, r.in_w, r.out_w});
      row = g.row0 + g.count * g.n;
    }
    if (r.row1 > row) out.push_back({row, r.row1, r.in_w, r.out_w});
  }
  return out;
}

void flash_bwd(const at::Tensor& qkv, const at::Tensor& ctx,
               const at::Tensor& dctx, const at::Tensor& lse, at::Tensor& dqkv,
               const std::vector<Group>& groups, int64_t H, bool causal) {
  for_each_group(groups, [&](int64_t i) {
    const Group& g = groups[i];
    const double scale = 1.0 / std::sqrt(double(g.w / H));
    auto q = head_view(qkv, g, H, 0), k = head_view(qkv, g, H, 1),
         v = head_view(qkv, g, H, 2);
    auto [dq, dk, dv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
        head_view(dctx, g, H).contiguous(), q, k, v,
        head_view(ctx, g, H).contiguous(),
        lse_view(lse, g, H).contiguous(), 0.0, causal,
        std::nullopt, scale);
    head_view(dqkv, g, H, 0).copy_(dq);
    head_view(dqkv, g, H, 1).copy_(dk);
    head_view(dqkv, g, H, 2).copy_(dv);
  });
}

// The per-run projections x -> Q, K, V into qkv[T, 3, D].
void project_qkv(const at::Tensor& x, const at::Tensor& w_qkv,
                 const at::Tensor& b_qkv, at::Tensor& qkv,
                 const std::vector<Run>& runs) {
  for (const Run& r : runs) {
    const int64_t w = r.in_w;
    for (int64_t i = 0; i < 3; ++i) {
      auto out = qkv.select(1, i).slice(0, r.row0, r.row1).slice(1, 0, w);
      addmm_into(out, b_qkv[i].slice(0, 0, w), block(x, r, 0, w),
                 w_qkv[i].slice(0, 0, w).slice(1, 0, w).t());
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_cpu(
    const at::Tensor& x_, const at::Tensor& cu_seqlens, const at::Tensor& widths,
    const at::Tensor& w_qkv_, const at::Tensor& b_qkv, const at::Tensor& w_o_,
    const at::Tensor& b_o, int64_t num_heads, bool causal, bool save) {
  const auto c = check(x_, cu_seqlens, widths, w_qkv_, w_o_, num_heads);
  const int64_t T = x_.size(0), D = x_.size(1);
  check_like(b_qkv, x_, kOp, "b_qkv", {3, D});
  check_like(b_o, x_, kOp, "b_o", {D});
  const auto x = x_.contiguous(), w_qkv = w_qkv_.contiguous(), w_o = w_o_.contiguous();
  // Columns beyond each run's width are zeroed after the leading columns of
  // its rows were written (and the fresh pages faulted in): cheaper than
  // zero-filling whole buffers first.
  auto out = at::empty({T, D}, x.options());
  auto qkv = at::empty({T, 3, D}, x.options());
  auto ctx = at::empty({T, D}, x.options());
  auto lse = at::empty({T, num_heads}, x.options().dtype(acc_type(x.scalar_type())));
  // Inference: groups of at least kMinFusedRows rows run fused (nothing
  // saved); the staged path below covers the rest of the rows: scattered
  // samples and small groups, whose projections are better done as one GEMM
  // per stretch of a run than as two per group (real data: many small groups).
  std::vector<Group> fused, flash;
  for (const Group& g : c.groups)
    (!save && g.count * g.n >= kMinFusedRows ? fused : flash).push_back(g);
  const auto staged = fused.empty() ? c.runs : outside_groups(c.runs, fused);
  project_qkv(x, w_qkv, b_qkv, qkv, staged);
  if (save)
    for (const Run& r : c.runs) qkv.slice(0, r.row0, r.row1).slice(2, r.in_w, D).zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "sliced_attention_fwd", [&] {
    attention_fwd<scalar_t>(qkv, ctx, lse, c.tasks, num_heads, causal);
  });
  flash_fwd(qkv, ctx, lse, flash, num_heads, causal);
  fused_groups_fwd(x, w_qkv, b_qkv, w_o, b_o, fused, num_heads, causal, out);
  for (const Run& r : staged) {
    addmm_into(block(out, r, 0, r.in_w), b_o.slice(0, 0, r.in_w),
               block(ctx, r, 0, r.in_w), w_o.slice(0, 0, r.in_w).slice(1, 0, r.in_w).t());
  }
  for (const Run& r : c.runs) {
    block(out, r, r.in_w, D).zero_();
    if (save) block(ctx, r, r.in_w, D).zero_();
  }
  if (!save)
    return {out, at::empty({0, 3, D}, qkv.options()), at::empty({0, D}, ctx.options()),
            at::empty({0, num_heads}, lse.options())};
  return {out, qkv, ctx, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& grad_out_, const at::Tensor& x_,
    const at::Tensor& cu_seqlens, const at::Tensor& widths,
    const at::Tensor& w_qkv_, const at::Tensor& w_o_, const at::Tensor& qkv_,
    const at::Tensor& ctx_, const at::Tensor& lse_, int64_t num_heads,
    bool causal) {
  const auto c = check(x_, cu_seqlens, widths, w_qkv_, w_o_, num_heads);
  const int64_t T = x_.size(0), D = x_.size(1);
  constexpr const char* op = "sliced_attention_backward";
  check_like(grad_out_, x_, op, "grad_out", {T, D});
  check_like(qkv_, x_, op, "qkv", {T, 3, D});
  check_like(ctx_, x_, op, "ctx", {T, D});
  const auto stat_t = acc_type(x_.scalar_type());
  TORCH_CHECK_VALUE(lse_.sizes() == at::IntArrayRef({T, num_heads}),
                    "canet.sliced_attention_backward: lse must have shape [", T,
                    ", ", num_heads, "], got ", lse_.sizes());
  const auto x = x_.contiguous(), w_qkv = w_qkv_.contiguous(), w_o = w_o_.contiguous();
  const auto dy = grad_out_.contiguous(), qkv = qkv_.contiguous();
  const auto ctx = ctx_.contiguous(), lse = lse_.to(stat_t).contiguous();
  const auto acc = x.options().dtype(stat_t);
  auto dctx = at::zeros({T, D}, x.options());
  auto gwo = at::zeros({D, D}, acc), gbo = at::zeros({D}, acc);
  // Runs add into the shared leading blocks one after another: deterministic.
  for (const Run& r : c.runs) {
    const int64_t w = r.in_w;
    auto d = block(dy, r, 0, w);
    gwo.slice(0, 0, w).slice(1, 0, w).add_(at::mm(d.t(), block(ctx, r, 0, w)).to(stat_t));
    gbo.slice(0, 0, w).add_(d.sum(0, false, stat_t));
    mm_into(block(dctx, r, 0, w), d, w_o.slice(0, 0, w).slice(1, 0, w));
  }
  auto dqkv = at::zeros({T, 3, D}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "sliced_attention_backward", [&] {
    attention_bwd<scalar_t>(qkv, ctx, dctx, lse, dqkv, c.tasks, num_heads, causal);
  });
  flash_bwd(qkv, ctx, dctx, lse, dqkv, c.groups, num_heads, causal);
  auto gx = at::zeros_like(x);
  auto gwqkv = at::zeros({3, D, D}, acc), gbqkv = at::zeros({3, D}, acc);
  for (const Run& r : c.runs) {
    const int64_t w = r.in_w;
    auto xs = block(x, r, 0, w);
    auto gxs = block(gx, r, 0, w);
    for (int64_t i = 0; i < 3; ++i) {
      auto d = dqkv.select(1, i).slice(0, r.row0, r.row1).slice(1, 0, w);
      gwqkv[i].slice(0, 0, w).slice(1, 0, w).add_(at::mm(d.t(), xs).to(stat_t));
      gbqkv[i].slice(0, 0, w).add_(d.sum(0, false, stat_t));
      gxs.addmm_(d, w_qkv[i].slice(0, 0, w).slice(1, 0, w));
    }
  }
  const auto dt = x.scalar_type();
  return {gx, gwqkv.to(dt), gbqkv.to(dt), gwo.to(dt), gbo.to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(canet, CPU, m) {
  m.impl("sliced_attention_fwd", &fwd_cpu);
  m.impl("sliced_attention_backward", &bwd_cpu);
}

}  // namespace canet
