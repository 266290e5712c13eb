// The compiled CPU code of adafilter.layers.cpu_gate (built by `adafilter build-kernels`):
// the recurrent gate's eval step, the batch-1 gated layer, and the gated BN's per-plane passes.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

// y[0:n] += a * x[0:n]
static inline void axpy(float a, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

struct Gate {  // one layer's eval weights (see gate_weights.EvalWeights), validated once per call
  const float *emb, *emb_bias, *inp, *bias, *hid, *head, *head_bias;
  int64_t C, E, K, G4, Hd, Co;
};

static Gate gate_weights(const at::Tensor& x, const at::Tensor& emb, const at::Tensor& emb_bias,
                         const at::Tensor& inp, const at::Tensor& bias, const at::Tensor& hid,
                         const at::Tensor& head, const at::Tensor& head_bias,
                         const at::Tensor& h0, const at::Tensor& c0) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, "x must be (B, C, H, W) float32");
  for (const at::Tensor* t : {&emb, &emb_bias, &inp, &bias, &hid, &head, &head_bias, &h0, &c0})
    TORCH_CHECK(t->numel() == 0 || (t->is_contiguous() && t->scalar_type() == at::kFloat),
                "gate weights must be contiguous float32");
  const bool has_emb = emb.numel() > 0;
  Gate g{has_emb ? emb.data_ptr<float>() : nullptr,
         has_emb ? emb_bias.data_ptr<float>() : nullptr,
         inp.data_ptr<float>(), bias.data_ptr<float>(), hid.data_ptr<float>(),
         head.data_ptr<float>(), head_bias.data_ptr<float>(),
         x.size(1), has_emb ? emb.size(0) : 0, inp.size(0), inp.size(1), inp.size(1) / 4,
         head.size(1)};
  TORCH_CHECK(g.K == (has_emb ? g.E : g.C), "input map does not match the input channels");
  TORCH_CHECK(!has_emb || emb.size(1) == g.C, "embedding does not match the input channels");
  return g;
}

// The gate for one example: its input planes xp (C, HW) -> logits lp (Co), state hp, cp (Hd);
// h0, c0 (Hd) or null. The g rows are pre-doubled: tanh(g) = 2 sigmoid(2 g) - 1.
static void gate_one(const Gate& g, const float* xp, int64_t HW, const float* h0,
                     const float* c0, float* lp, float* hp, float* cp) {
  std::vector<float> pooled(g.C), e(std::max<int64_t>(g.E, 1)), gates(g.G4);
  const float alpha = 1.f / static_cast<float>(HW);
  // global average pool, over ATen's threads for large inputs (the early layers)
  at::parallel_for(0, g.C, std::max<int64_t>(1, 32768 / std::max<int64_t>(HW, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      const float* p = xp + ch * HW;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < HW; ++i) acc += p[i];
      pooled[ch] = acc * alpha;
    }
  });
  const float* v = pooled.data();
  if (g.emb) {  // the layer's 1x1 conv on the pooled vector
    for (int64_t j = 0; j < g.E; ++j) {
      const float* row = g.emb + j * g.C;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < g.C; ++i) acc += row[i] * v[i];
      e[j] = acc + g.emb_bias[j];
    }
    v = e.data();
  }
  std::copy(g.bias, g.bias + g.G4, gates.begin());
  for (int64_t k = 0; k < g.K; ++k) axpy(v[k], g.inp + k * g.G4, gates.data(), g.G4);
  if (h0)
    for (int64_t j = 0; j < g.Hd; ++j) axpy(h0[j], g.hid + j * g.G4, gates.data(), g.G4);
  const int64_t Hd = g.Hd;
  for (int64_t j = 0; j < Hd; ++j) {  // the LSTM cell, PyTorch's gate order i, f, g, o
    const float i_ = 1.f / (1.f + std::exp(-gates[j]));
    const float f_ = 1.f / (1.f + std::exp(-gates[Hd + j]));
    const float g2 = 1.f / (1.f + std::exp(-gates[2 * Hd + j]));
    const float o_ = 1.f / (1.f + std::exp(-gates[3 * Hd + j]));
    float cc = i_ * (2.f * g2 - 1.f);
    if (c0) cc += f_ * c0[j];
    cp[j] = cc;
    hp[j] = o_ * std::tanh(cc);
  }
  std::copy(g.head_bias, g.head_bias + g.Co, lp);
  for (int64_t j = 0; j < Hd; ++j) axpy(hp[j], g.head + j * g.Co, lp, g.Co);
}

// One eval step of the recurrent gate for every example of x (B, C_in, H, W), float32.
// emb (E, C_in) and emb_bias (E) or empty; inp (K, 4H); bias (4H); hid (H, 4H);
// head (H, C_out); head_bias (C_out); h0, c0 (B, H) or empty.
// Returns logits (B, C_out), h, c (B, H).
std::vector<at::Tensor> step(const at::Tensor& x, const at::Tensor& emb,
                             const at::Tensor& emb_bias, const at::Tensor& inp,
                             const at::Tensor& bias, const at::Tensor& hid,
                             const at::Tensor& head, const at::Tensor& head_bias,
                             const at::Tensor& h0, const at::Tensor& c0) {
  const Gate g = gate_weights(x, emb, emb_bias, inp, bias, hid, head, head_bias, h0, c0);
  const int64_t B = x.size(0), HW = x.size(2) * x.size(3);
  const bool has_state = h0.numel() > 0;
  const at::Tensor xc = x.contiguous();
  at::Tensor logits = at::empty({B, g.Co}, x.options());
  at::Tensor h = at::empty({B, g.Hd}, x.options()), c = at::empty({B, g.Hd}, x.options());
  for (int64_t b = 0; b < B; ++b)
    gate_one(g, xc.data_ptr<float>() + b * g.C * HW, HW,
             has_state ? h0.data_ptr<float>() + b * g.Hd : nullptr,
             has_state ? c0.data_ptr<float>() + b * g.Hd : nullptr,
             logits.data_ptr<float>() + b * g.Co, h.data_ptr<float>() + b * g.Hd,
             c.data_ptr<float>() + b * g.Hd);
  return {logits, h, c};
}

// A whole gated layer at batch 1 (eval), bound once to its tensors: the gate's eval weights
// (as for `step`), the example's filter bank prev (C_out bool: the decisions w, b hold), w
// (C_out, ...), b (C_out), the BN-folded banks w_f, b_f (F) and w_s, b_s (S), the conv's
// arguments, and the source tensors all of these were computed from. run() returns nothing
// when a source moved or changed in place since (the caller rebuilds the Layer) or when x is
// not a (1, C_in, H, W) float32 CPU tensor (the caller takes another path).
struct Layer {
  std::vector<at::Tensor> gate_w;  // emb, emb_bias, inp, bias, hid, head, head_bias
  at::Tensor prev, w, b, w_f, b_f, w_s, b_s;
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
  std::vector<at::Tensor> sources;
  std::vector<std::pair<const void*, int64_t>> seen;  // (data_ptr, version) of each source

  Layer(std::vector<at::Tensor> gate_w_, std::vector<at::Tensor> bank,
        std::vector<int64_t> stride_, std::vector<int64_t> padding_,
        std::vector<int64_t> dilation_, int64_t groups_, std::vector<at::Tensor> sources_)
      : gate_w(std::move(gate_w_)), stride(std::move(stride_)), padding(std::move(padding_)),
        dilation(std::move(dilation_)), groups(groups_), sources(std::move(sources_)) {
    TORCH_CHECK(gate_w.size() == 7 && bank.size() == 7, "7 gate weights and 7 bank tensors");
    prev = bank[0], w = bank[1], b = bank[2], w_f = bank[3], b_f = bank[4], w_s = bank[5];
    b_s = bank[6];
    const int64_t Co = prev.numel();
    for (const at::Tensor* t : {&w, &b, &w_f, &b_f, &w_s, &b_s})
      TORCH_CHECK(t->is_contiguous() && t->scalar_type() == at::kFloat && t->size(0) == Co,
                  "filter banks must be contiguous float32 with one row per decision");
    TORCH_CHECK(prev.is_contiguous() && prev.scalar_type() == at::kBool,
                "prev must hold one bool per filter");
    for (const at::Tensor& t : sources) seen.emplace_back(t.data_ptr(), t._version());
  }

  std::vector<at::Tensor> run(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0) {
    for (size_t i = 0; i < sources.size(); ++i)
      if (sources[i].data_ptr() != seen[i].first || sources[i]._version() != seen[i].second)
        return {};
    if (x.dim() != 4 || x.size(0) != 1 || x.scalar_type() != at::kFloat || !x.device().is_cpu())
      return {};
    const std::vector<at::Tensor>& gw = gate_w;
    const Gate g = gate_weights(x, gw[0], gw[1], gw[2], gw[3], gw[4], gw[5], gw[6], h0, c0);
    const int64_t Co = g.Co;
    TORCH_CHECK(prev.numel() == Co, "the gate's head does not match the filter bank");
    const at::Tensor xc = x.contiguous();
    const bool has_state = h0.numel() > 0;
    std::vector<float> logits(Co);
    at::Tensor h = at::empty({1, g.Hd}, x.options()), c = at::empty({1, g.Hd}, x.options());
    gate_one(g, xc.data_ptr<float>(), x.size(2) * x.size(3),
             has_state ? h0.data_ptr<float>() : nullptr,
             has_state ? c0.data_ptr<float>() : nullptr, logits.data(), h.data_ptr<float>(),
             c.data_ptr<float>());
    at::Tensor dec = at::empty({1, Co}, x.options().dtype(at::kBool));
    bool* dp = dec.data_ptr<bool>();
    bool* pp = prev.data_ptr<bool>();
    const int64_t row = w.numel() / std::max<int64_t>(Co, 1);
    float *wp = w.data_ptr<float>(), *bp = b.data_ptr<float>();
    for (int64_t j = 0; j < Co; ++j) {
      dp[j] = logits[j] >= 0.f;  // Eq. 2
      if (dp[j] == pp[j]) continue;  // consecutive inputs share most decisions
      const at::Tensor& src_w = dp[j] ? w_f : w_s;
      std::memcpy(wp + j * row, src_w.data_ptr<float>() + j * row, row * sizeof(float));
      bp[j] = (dp[j] ? b_f : b_s).data_ptr<float>()[j];
      pp[j] = dp[j];
    }
    return {at::conv2d(x, w, b, stride, padding, dilation, groups), dec, h, c};
  }
};

// ---- the gated BN's per-plane passes in training (Eq. 5), float32 NCHW ----------------------
// Planes are (example, channel) pairs; sel (B, C) float32 routes a plane to F (> 0.5) or S.
// Each pass reads only what it needs (the routed branch's plane where one suffices), spread
// over ATen's threads in chunks of about 16k values.

static void check_planes(const at::Tensor& xf, const at::Tensor& xs) {
  TORCH_CHECK(xf.dim() == 4 && xf.sizes() == xs.sizes(), "xf, xs must be equal (B, C, H, W)");
  for (const at::Tensor* t : {&xf, &xs})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "gated BN planes must be contiguous float32 CPU tensors");
}

static const float* routing(const at::Tensor& sel, const at::Tensor& x) {
  TORCH_CHECK(sel.scalar_type() == at::kFloat && sel.is_contiguous() &&
                  sel.numel() == x.size(0) * x.size(1),
              "sel must be a contiguous (B, C) float32 tensor");
  return sel.data_ptr<float>();
}

static int64_t grain(int64_t hw) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(hw, 1)); }

// Mean and biased variance (B, C) of each routed plane: where(sel, xf, xs) never built.
std::vector<at::Tensor> bn_stats(const at::Tensor& xf, const at::Tensor& xs,
                                 const at::Tensor& sel) {
  check_planes(xf, xs);
  const float *g = routing(sel, xf), *pf = xf.data_ptr<float>(), *ps = xs.data_ptr<float>();
  const int64_t n = xf.size(0) * xf.size(1), hw = xf.size(2) * xf.size(3);
  at::Tensor mean = at::empty({xf.size(0), xf.size(1)}, xf.options()), var = at::empty_like(mean);
  float *pm = mean.data_ptr<float>(), *pv = var.data_ptr<float>();
  at::parallel_for(0, n, grain(hw), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* x = (g[i] > 0.5f ? pf : ps) + i * hw;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < hw; ++j) s += x[j];
      const float mu = s / static_cast<float>(hw);
      float q = 0.f;  // second pass over a plane still in cache: stable
#pragma omp simd reduction(+ : q)
      for (int64_t j = 0; j < hw; ++j) q += (x[j] - mu) * (x[j] - mu);
      pm[i] = mu;
      pv[i] = q / static_cast<float>(hw);
    }
  });
  return {mean, var};
}

// out = routed plane * scale[r, c] + shift[r, c], r = 0 (F) / 1 (S): Eq. 1 and Eq. 5 at once.
at::Tensor bn_apply(const at::Tensor& xf, const at::Tensor& xs, const at::Tensor& sel,
                    const at::Tensor& scale, const at::Tensor& shift) {
  check_planes(xf, xs);
  const int64_t C = xf.size(1), n = xf.size(0) * C, hw = xf.size(2) * xf.size(3);
  for (const at::Tensor* t : {&scale, &shift})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == 2 * C,
                "scale, shift must be contiguous (2, C) float32");
  const float *g = routing(sel, xf), *pf = xf.data_ptr<float>(), *ps = xs.data_ptr<float>();
  const float *a = scale.data_ptr<float>(), *b = shift.data_ptr<float>();
  at::Tensor out = at::empty_like(xf);
  float* po = out.data_ptr<float>();
  at::parallel_for(0, n, grain(hw), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const bool f = g[i] > 0.5f;
      const float* x = (f ? pf : ps) + i * hw;
      const int64_t at_ = (f ? 0 : C) + i % C;
      const float k = a[at_], d = b[at_];
      float* y = po + i * hw;
#pragma omp simd
      for (int64_t j = 0; j < hw; ++j) y[j] = x[j] * k + d;
    }
  });
  return out;
}

// sum_hw dy (B, C) and sum_hw dy * x of both branches (2, B, C), one pass.
std::vector<at::Tensor> bn_sums(const at::Tensor& dy, const at::Tensor& xf, const at::Tensor& xs) {
  check_planes(xf, xs);
  check_planes(dy, xf);
  const int64_t n = xf.size(0) * xf.size(1), hw = xf.size(2) * xf.size(3);
  at::Tensor a = at::empty({xf.size(0), xf.size(1)}, xf.options());
  at::Tensor p = at::empty({2, xf.size(0), xf.size(1)}, xf.options());
  const float *pd = dy.data_ptr<float>(), *pf = xf.data_ptr<float>(), *ps = xs.data_ptr<float>();
  float *pa = a.data_ptr<float>(), *pp = p.data_ptr<float>();
  at::parallel_for(0, n, grain(hw), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float *d = pd + i * hw, *u = pf + i * hw, *v = ps + i * hw;
      float sa = 0.f, sf = 0.f, ss = 0.f;
#pragma omp simd reduction(+ : sa, sf, ss)
      for (int64_t j = 0; j < hw; ++j) {
        sa += d[j];
        sf += d[j] * u[j];
        ss += d[j] * v[j];
      }
      pa[i] = sa;
      pp[i] = sf;
      pp[n + i] = ss;
    }
  });
  return {a, p};
}

// Both branches' input gradients: k1 dy + k2 x + k3 on the routed branch's plane (k (3, 2, B, C):
// k1, k2, k3 of F and S), zero on the other's; a branch not wanted is not computed (undefined).
std::vector<at::Tensor> bn_grads(const at::Tensor& dy, const at::Tensor& xf, const at::Tensor& xs,
                                 const at::Tensor& sel, const at::Tensor& k, bool want_f,
                                 bool want_s) {
  check_planes(xf, xs);
  check_planes(dy, xf);
  const int64_t n = xf.size(0) * xf.size(1), hw = xf.size(2) * xf.size(3);
  TORCH_CHECK(k.scalar_type() == at::kFloat && k.is_contiguous() && k.numel() == 6 * n,
              "k must be a contiguous (3, 2, B, C) float32 tensor");
  const float *g = routing(sel, xf), *pk = k.data_ptr<float>(), *pd = dy.data_ptr<float>();
  const float *pf = xf.data_ptr<float>(), *ps = xs.data_ptr<float>();
  at::Tensor dxf = want_f ? at::empty_like(xf) : at::Tensor();
  at::Tensor dxs = want_s ? at::empty_like(xs) : at::Tensor();
  float* out[2] = {want_f ? dxf.data_ptr<float>() : nullptr,
                   want_s ? dxs.data_ptr<float>() : nullptr};
  at::parallel_for(0, n, grain(hw), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int r = g[i] > 0.5f ? 0 : 1;  // the routed branch
      if (out[1 - r]) std::memset(out[1 - r] + i * hw, 0, hw * sizeof(float));
      if (!out[r]) continue;
      const float k1 = pk[r * n + i], k2 = pk[(2 + r) * n + i], k3 = pk[(4 + r) * n + i];
      const float *d = pd + i * hw, *x = (r == 0 ? pf : ps) + i * hw;
      float* y = out[r] + i * hw;
#pragma omp simd
      for (int64_t j = 0; j < hw; ++j) y[j] = k1 * d[j] + k2 * x[j] + k3;
    }
  });
  return {dxf, dxs};
}

// Both branches' statistics from the per-plane ones, the normalisation each channel uses
// (batch or running statistics, by the minimum-examples and whole-branch rules) and the running
// statistics' update (Triton: _branch_stats_kernel). bn: weight, bias, running mean, running
// var, num_batches_tracked of BN_F then BN_S; hp: eps_f, eps_s, momentum_f, momentum_s.
// Returns (5, 2, C) [mean, rstd, scale, shift, count] and (2, C) bool: batch statistics used.
std::vector<at::Tensor> bn_branch_stats(const at::Tensor& mean, const at::Tensor& var,
                                        const at::Tensor& sel, int64_t hw,
                                        std::vector<at::Tensor> bn, std::vector<double> hp,
                                        int64_t min_examples, int64_t min_values) {
  TORCH_CHECK(bn.size() == 10 && hp.size() == 4, "10 BN tensors and 4 settings");
  const int64_t B = mean.size(0), C = mean.size(1);
  for (const at::Tensor* t : {&mean, &var})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == B * C,
                "mean, var must be contiguous (B, C) float32");
  for (int i : {0, 1, 2, 3, 5, 6, 7, 8})
    TORCH_CHECK(bn[i].scalar_type() == at::kFloat && bn[i].is_contiguous() && bn[i].numel() == C,
                "BN parameters and running statistics must be contiguous float32 (C)");
  const float *g = routing(sel, mean), *pm = mean.data_ptr<float>(), *pv = var.data_ptr<float>();
  bool all_f = true, all_s = true;  // the policy's min and max over the batch
  for (int64_t i = 0; i < B * C; ++i) (g[i] > 0.5f ? all_s : all_f) = false;
  at::Tensor out = at::empty({5, 2, C}, mean.options());
  at::Tensor use = at::empty({2, C}, mean.options().dtype(at::kBool));
  at::Tensor run = at::empty({2, 2, C}, mean.options());  // new running mean, var of F and S
  float *po = out.data_ptr<float>(), *pr = run.data_ptr<float>();
  bool* pu = use.data_ptr<bool>();
  at::parallel_for(0, C, 64, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double k[2] = {0, 0}, s[2] = {0, 0}, q[2] = {0, 0};
      for (int64_t b = 0; b < B; ++b) {
        const int r = g[b * C + c] > 0.5f ? 0 : 1;
        k[r] += 1;
        s[r] += pm[b * C + c];
      }
      const double mu[2] = {s[0] / std::max(k[0], 1.0), s[1] / std::max(k[1], 1.0)};
      for (int64_t b = 0; b < B; ++b) {  // Chan et al.: sum_b [M2_b + hw (mean_b - mean)^2]
        const int r = g[b * C + c] > 0.5f ? 0 : 1;
        const double d = pm[b * C + c] - mu[r];
        q[r] += pv[b * C + c] + d * d;
      }
      for (int r = 0; r < 2; ++r) {
        const double n = k[r] * hw, v = q[r] * hw / std::max(n, 1.0);
        // a branch holding every example in every channel is a standard BN
        const bool whole = (r == 0 ? all_f : all_s) && n > 1;
        const bool u = (k[r] >= min_examples && n >= min_values) || whole;
        const float* w = bn[5 * r].data_ptr<float>();
        const float* bi = bn[5 * r + 1].data_ptr<float>();
        const float rm = bn[5 * r + 2].data_ptr<float>()[c];
        const float rv = bn[5 * r + 3].data_ptr<float>()[c];
        const double m_used = u ? mu[r] : rm;
        // a stored variance that is not positive is no estimate: BN's initial variance 1
        const double rstd = 1.0 / std::sqrt((u ? v : (rv > 0.0f ? rv : 1.0)) + hp[r]);
        const double scale = w[c] * rstd;
        const int64_t at_ = r * C + c;
        po[at_] = static_cast<float>(m_used);
        po[2 * C + at_] = static_cast<float>(rstd);
        po[4 * C + at_] = static_cast<float>(scale);
        po[6 * C + at_] = static_cast<float>(bi[c] - m_used * scale);
        po[8 * C + at_] = static_cast<float>(n);
        pu[at_] = u;
        const double unbiased = v * n / std::max(n - 1.0, 1.0), mom = hp[2 + r];
        pr[2 * r * C + c] = static_cast<float>(u ? rm + mom * (mu[r] - rm) : rm);
        pr[(2 * r + 1) * C + c] = static_cast<float>(u ? rv + mom * (unbiased - rv) : rv);
      }
    }
  });
  for (int r = 0; r < 2; ++r) {  // in place through ATen, so the buffers' versions move on
    bn[5 * r + 2].copy_(run[r][0]);
    bn[5 * r + 3].copy_(run[r][1]);
    bn[5 * r + 4].add_(1);
  }
  return {out, use};
}

// The backward's coefficients k (3, 2, B, C) -- dx = k1 dy + k2 x + k3 per branch, zero where a
// plane is not routed to it --, the affine gradients (2, 2, C) [dgamma; dbeta] and dL/dG (B, C)
// from the per-plane sums a = sum_hw dy (B, C), p = sum_hw dy x (2, B, C) (Triton:
// _branch_coeffs_kernel). stats (5, 2, C) and use (2, C) as bn_branch_stats returns them.
std::vector<at::Tensor> bn_coeffs(const at::Tensor& sel, const at::Tensor& stats,
                                  const at::Tensor& use, const at::Tensor& a,
                                  const at::Tensor& p) {
  const int64_t B = a.size(0), C = a.size(1), n = B * C;
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.is_contiguous() && stats.numel() == 10 * C,
              "stats must be contiguous (5, 2, C) float32");
  TORCH_CHECK(use.scalar_type() == at::kBool && use.is_contiguous() && use.numel() == 2 * C,
              "use must be contiguous (2, C) bool");
  for (const at::Tensor* t : {&a, &p})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "sums must be float32");
  TORCH_CHECK(a.numel() == n && p.numel() == 2 * n, "a (B, C), p (2, B, C)");
  const float *g = routing(sel, a), *st = stats.data_ptr<float>(), *pa = a.data_ptr<float>();
  const float* pp = p.data_ptr<float>();
  const bool* pu = use.data_ptr<bool>();
  at::Tensor k = at::empty({3, 2, B, C}, a.options()), dgb = at::empty({2, 2, C}, a.options());
  at::Tensor dg = at::empty({B, C}, a.options());
  float *pk = k.data_ptr<float>(), *pg = dgb.data_ptr<float>(), *pd = dg.data_ptr<float>();
  at::parallel_for(0, C, 64, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double db[2] = {0, 0}, dw[2] = {0, 0};
      const float mean[2] = {st[c], st[C + c]};
      for (int64_t b = 0; b < B; ++b) {  // dbeta = sum dy, dgamma / rstd = sum dy (x - mean)
        const int64_t i = b * C + c;
        const int r = g[i] > 0.5f ? 0 : 1;
        db[r] += pa[i];
        dw[r] += pp[r * n + i] - mean[r] * pa[i];
      }
      float k1[2], k2[2], k3[2], sh[2];
      for (int r = 0; r < 2; ++r) {
        const int64_t at_ = r * C + c;
        const double rstd = st[2 * C + at_], sc = st[4 * C + at_];
        const double cnt = std::max<double>(st[8 * C + at_], 1.0);
        dw[r] *= rstd;
        const double kk2 = pu[at_] ? -sc * rstd * dw[r] / cnt : 0.0;  // running stats: constants
        k1[r] = static_cast<float>(sc);
        k2[r] = static_cast<float>(kk2);
        k3[r] = static_cast<float>((pu[at_] ? -sc * db[r] / cnt : 0.0) - kk2 * mean[r]);
        sh[r] = st[6 * C + at_];
        pg[at_] = static_cast<float>(dw[r]);
        pg[2 * C + at_] = static_cast<float>(db[r]);
      }
      for (int64_t b = 0; b < B; ++b) {
        const int64_t i = b * C + c;
        const int r = g[i] > 0.5f ? 0 : 1;
        for (int j = 0; j < 2; ++j) {  // only the routed branch's coefficients are non-zero
          pk[j * n + i] = j == r ? k1[j] : 0.f;
          pk[(2 + j) * n + i] = j == r ? k2[j] : 0.f;
          pk[(4 + j) * n + i] = j == r ? k3[j] : 0.f;
        }
        // dL/dG = sum_hw dy (y_F - y_S), both branches' BN as affine maps (Eq. 5)
        pd[i] = (k1[0] * pp[i] + sh[0] * pa[i]) - (k1[1] * pp[n + i] + sh[1] * pa[i]);
      }
    }
  });
  return {k, dgb, dg};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bn_branch_stats", &bn_branch_stats, "gated BN: both branches' statistics");
  m.def("bn_coeffs", &bn_coeffs, "gated BN backward: coefficients and policy gradient");
  m.def("step", &step, "the gate's eval step for every example");
  m.def("bn_stats", &bn_stats, "gated BN: mean and variance of each routed plane",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("bn_apply", &bn_apply, "gated BN: select and normalise (Eq. 1, Eq. 5)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("bn_sums", &bn_sums, "gated BN backward: per-plane sums of dy and dy * x",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("bn_grads", &bn_grads, "gated BN backward: both branches' input gradients",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  pybind11::class_<Layer>(m, "Layer")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>,
                          std::vector<int64_t>, std::vector<int64_t>, int64_t,
                          std::vector<at::Tensor>>())
      // the conv and the recopy run without the GIL; the caller serialises runs on one bank
      .def("run", &Layer::run, pybind11::call_guard<pybind11::gil_scoped_release>());
}
