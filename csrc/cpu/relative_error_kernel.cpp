// CPU kernels of the relative-error op family: per-sample squared sums and their backward.
//
// Work is split into (layer, sample, chunk) items so that one parallel region covers every
// layer of a multi-layer call, a single huge sample (B = 1) is split inside the sample, and many
// tiny samples are grouped by at::parallel_for's grain. Each item reads its slice of clean and
// perturbed once. Partial sums of a sample's chunks are combined in float64 in a fixed order,
// so results do not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "relative_error.h"

namespace lsa_ext {
namespace {

constexpr int64_t kChunk = 32768;  // elements per work item
constexpr int kLanes = 16;         // independent accumulators (vectorisable, better rounding)

struct LayerView {
  const void* a;
  const void* b;
  int64_t per_sample;    // elements per sample
  int64_t sample_step;   // distance between samples in elements
  int64_t chunks;        // chunks per sample
  int64_t first_item;    // index of this layer's first work item
};

// Builds the work plan; returns the total number of items.
int64_t plan(const std::vector<at::Tensor>& as, const std::vector<at::Tensor>& bs, int64_t batch,
             std::vector<LayerView>& views) {
  int64_t items = 0;
  views.resize(as.size());
  for (size_t l = 0; l < as.size(); ++l) {
    const int64_t per = batch == 0 ? 0 : as[l].numel() / batch;
    LayerView& v = views[l];
    v.a = as[l].const_data_ptr();
    v.b = bs[l].const_data_ptr();
    v.per_sample = per;
    v.sample_step = batch > 1 ? as[l].stride(0) : per;
    v.chunks = std::max<int64_t>(1, (per + kChunk - 1) / kChunk);
    v.first_item = items;
    items += v.chunks * batch;
  }
  return items;
}

// Locates item `it`: layer index, sample, chunk.
inline void locate(const std::vector<LayerView>& views, int64_t it, size_t& l, int64_t& i,
                   int64_t& c) {
  // Layers are few; a linear scan from a binary search start keeps this cheap.
  size_t lo = 0, hi = views.size();
  while (hi - lo > 1) {
    size_t mid = (lo + hi) / 2;
    if (views[mid].first_item <= it) lo = mid; else hi = mid;
  }
  l = lo;
  const int64_t local = it - views[l].first_item;
  i = local / views[l].chunks;
  c = local % views[l].chunks;
}

template <typename scalar_t>
void chunk_sums(const scalar_t* a, const scalar_t* b, int64_t n, double& d_out, double& n_out) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t d[kLanes] = {}, s[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const acc_t x = static_cast<acc_t>(a[j + k]);
      const acc_t t = x - static_cast<acc_t>(b[j + k]);
      d[k] += t * t;
      s[k] += x * x;
    }
  }
  for (int k = 0; j < n; ++j, ++k) {
    const acc_t x = static_cast<acc_t>(a[j]);
    const acc_t t = x - static_cast<acc_t>(b[j]);
    d[k] += t * t;
    s[k] += x * x;
  }
  double dd = 0, ss = 0;
  for (int k = 0; k < kLanes; ++k) {
    dd += static_cast<double>(d[k]);
    ss += static_cast<double>(s[k]);
  }
  d_out = dd;
  n_out = ss;
}

// Forward for L layers sharing batch size B; returns (diff, norm) of shape [L, B].
std::tuple<at::Tensor, at::Tensor> sq_sums_impl(std::vector<at::Tensor> as,
                                                std::vector<at::Tensor> bs) {
  const int64_t batch = as[0].size(0);
  const auto dtype = as[0].scalar_type();
  const auto acc = acc_type_for(dtype);
  const int64_t L = static_cast<int64_t>(as.size());
  for (size_t l = 0; l < as.size(); ++l) {
    auto p = same_layout(as[l], bs[l]);
    as[l] = p.first;
    bs[l] = p.second;
  }
  std::vector<LayerView> views;
  const int64_t items = plan(as, bs, batch, views);
  std::vector<double> pd(items), pn(items);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lsa_ext_sq_sums_cpu", [&] {
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      for (int64_t it = begin; it < end; ++it) {
        size_t l;
        int64_t i, c;
        locate(views, it, l, i, c);
        const LayerView& v = views[l];
        const int64_t start = c * kChunk;
        const int64_t len = std::min(kChunk, v.per_sample - start);
        const int64_t off = i * v.sample_step + start;
        if (len <= 0) {
          pd[it] = 0;
          pn[it] = 0;
          continue;
        }
        chunk_sums<scalar_t>(static_cast<const scalar_t*>(v.a) + off,
                             static_cast<const scalar_t*>(v.b) + off, len, pd[it], pn[it]);
      }
    });
  });

  auto opts = as[0].options().dtype(at::kDouble);
  at::Tensor diff = at::empty({L, batch}, opts);
  at::Tensor norm = at::empty({L, batch}, opts);
  double* dp = diff.data_ptr<double>();
  double* np = norm.data_ptr<double>();
  for (int64_t l = 0; l < L; ++l) {
    const LayerView& v = views[l];
    for (int64_t i = 0; i < batch; ++i) {
      double d = 0, s = 0;
      const int64_t base = v.first_item + i * v.chunks;
      for (int64_t c = 0; c < v.chunks; ++c) {
        d += pd[base + c];
        s += pn[base + c];
      }
      dp[l * batch + i] = d;
      np[l * batch + i] = s;
    }
  }
  if (acc != at::kDouble) {
    diff = diff.to(acc);
    norm = norm.to(acc);
  }
  return {diff, norm};
}

template <typename scalar_t>
void chunk_backward(const scalar_t* a, const scalar_t* b, scalar_t* ga, scalar_t* gb, int64_t n,
                    at::opmath_type<scalar_t> gd, at::opmath_type<scalar_t> gn) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t two_gd = 2 * gd, two_gn = 2 * gn;
  for (int64_t j = 0; j < n; ++j) {
    const acc_t x = static_cast<acc_t>(a[j]);
    const acc_t t = (x - static_cast<acc_t>(b[j])) * two_gd;
    ga[j] = static_cast<scalar_t>(t + x * two_gn);
    gb[j] = static_cast<scalar_t>(-t);
  }
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> sq_sums_backward_impl(
    const at::Tensor& grad_diff, const at::Tensor& grad_norm, std::vector<at::Tensor> as,
    std::vector<at::Tensor> bs) {
  const int64_t batch = as[0].size(0);
  const int64_t L = static_cast<int64_t>(as.size());
  const auto dtype = as[0].scalar_type();
  const auto acc = acc_type_for(dtype);
  TORCH_CHECK_VALUE(
      grad_diff.numel() == L * batch && grad_norm.numel() == L * batch,
      "grad_diff and grad_norm must have L * B = ", L * batch, " elements, got ",
      grad_diff.numel(), " and ", grad_norm.numel());
  const at::Tensor gd = grad_diff.to(acc).contiguous();
  const at::Tensor gn = grad_norm.to(acc).contiguous();
  std::vector<at::Tensor> gas(L), gbs(L);
  for (int64_t l = 0; l < L; ++l) {
    auto p = same_layout(as[l], bs[l]);
    as[l] = p.first;
    bs[l] = p.second;
    gas[l] = at::empty_like(as[l]);
    gbs[l] = at::empty_like(as[l]);
    TORCH_INTERNAL_ASSERT(gas[l].strides() == as[l].strides());
  }
  std::vector<LayerView> views;
  const int64_t items = plan(as, bs, batch, views);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lsa_ext_sq_sums_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* gdp = gd.const_data_ptr<acc_t>();
    const acc_t* gnp = gn.const_data_ptr<acc_t>();
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      for (int64_t it = begin; it < end; ++it) {
        size_t l;
        int64_t i, c;
        locate(views, it, l, i, c);
        const LayerView& v = views[l];
        const int64_t start = c * kChunk;
        const int64_t len = std::min(kChunk, v.per_sample - start);
        if (len <= 0) continue;
        const int64_t off = i * v.sample_step + start;
        chunk_backward<scalar_t>(static_cast<const scalar_t*>(v.a) + off,
                                 static_cast<const scalar_t*>(v.b) + off,
                                 gas[l].data_ptr<scalar_t>() + off,
                                 gbs[l].data_ptr<scalar_t>() + off, len,
                                 gdp[l * batch + i], gnp[l * batch + i]);
      }
    });
  });
  return {gas, gbs};
}

std::tuple<at::Tensor, at::Tensor> sq_sums_cpu(const at::Tensor& clean,
                                               const at::Tensor& perturbed) {
  check_pair(clean, perturbed, "");
  auto out = sq_sums_impl({clean}, {perturbed});
  return {std::get<0>(out).squeeze(0), std::get<1>(out).squeeze(0)};
}

std::tuple<at::Tensor, at::Tensor> sq_sums_multi_cpu(at::TensorList cleans,
                                                     at::TensorList perturbeds) {
  check_lists(cleans, perturbeds);
  return sq_sums_impl(cleans.vec(), perturbeds.vec());
}

std::tuple<at::Tensor, at::Tensor> sq_sums_backward_cpu(const at::Tensor& grad_diff,
                                                        const at::Tensor& grad_norm,
                                                        const at::Tensor& clean,
                                                        const at::Tensor& perturbed) {
  check_pair(clean, perturbed, "");
  auto out = sq_sums_backward_impl(grad_diff, grad_norm, {clean}, {perturbed});
  return {std::get<0>(out)[0], std::get<1>(out)[0]};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> sq_sums_multi_backward_cpu(
    const at::Tensor& grad_diff, const at::Tensor& grad_norm, at::TensorList cleans,
    at::TensorList perturbeds) {
  check_lists(cleans, perturbeds);
  return sq_sums_backward_impl(grad_diff, grad_norm, cleans.vec(), perturbeds.vec());
}

}  // namespace

TORCH_LIBRARY_IMPL(lsa_ext, CPU, m) {
  m.impl("sq_sums", &sq_sums_cpu);
  m.impl("sq_sums_backward", &sq_sums_backward_cpu);
  m.impl("sq_sums_multi", &sq_sums_multi_cpu);
  m.impl("sq_sums_multi_backward", &sq_sums_multi_backward_cpu);
}

}  // namespace lsa_ext
