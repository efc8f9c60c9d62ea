// CPU kernels of the relative-error op family: per-sample squared sums, the relative error
// computed from them (epilogue after the reduction), and the sums' backward.
//
// Plan: every (layer, sample) is cut into work items of about kChunk elements (2 MiB of output in
// the backward). A sample larger than that is split into equal chunks (so B = 1 with one huge
// sample uses all threads); smaller samples are grouped, several whole samples per item (so
// B = 4096 tiny samples does not pay per-sample scheduling). One parallel region serves every layer of a multi-layer call;
// threads take items from a shared counter (dynamic scheduling, robust on a busy machine). Work
// under ~1M elements runs on the calling thread. Each item reads its slice of clean and perturbed
// once. The parallel region is ATen's at::parallel_for, an OpenMP region inlined from ATen's
// headers: this file must be compiled with the compiler's OpenMP flag (setup.py adds -fopenmp),
// without which the pragma is ignored and one thread runs everything. cpu_threads_last_call()
// reports how many threads ran the last call (tests/test_ops_threads.py).
//
// Determinism: whole samples are summed inside one item; a split sample's chunk partials are
// stored per item and combined in float64 in chunk order afterwards. Results therefore do not
// depend on the number of threads or on scheduling.
//
// Layouts: any tensor whose samples are dense blocks of memory (contiguous, channels_last,
// channels_last_3d, ...) is read in place; perturbed is copied only when its layout differs from
// clean's, and a clean tensor that is not sample-major dense (slices, batch-transposed views) is
// copied once. Gradients have the layout of at::empty_like(clean) (what the fake kernel returns);
// gradients of >= 8 MiB get huge-page buffers (output_buffers.h) and are written with streaming
// stores (span_kernels.h), as fresh memory's page faults and cache-line reads otherwise dominate
// the backward.
//
// Inner loops (span_kernels.h) are compiled twice: portable (SSE2 on x86-64) and, on x86-64 with
// GCC/Clang, AVX2+FMA+F16C, chosen at run time with __builtin_cpu_supports. Set the environment
// variable LSA_EXT_CPU_ISA=generic to force the portable loops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

#include "cpu/output_buffers.h"
#include "relative_error.h"

#if defined(__x86_64__)
#include <immintrin.h>  // streaming stores (span_kernels.h), SSE2/AVX
#endif

#define LSA_ISA_NS generic
#define LSA_VEC_BYTES 16
#include "cpu/span_kernels.h"
#undef LSA_ISA_NS
#undef LSA_VEC_BYTES

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LSA_HAVE_AVX2_VARIANT 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define LSA_ISA_NS avx2
#define LSA_VEC_BYTES 32
#define LSA_USE_F16C 1
#include "cpu/span_kernels.h"
#undef LSA_ISA_NS
#undef LSA_VEC_BYTES
#undef LSA_USE_F16C
#pragma GCC pop_options
#else
#define LSA_HAVE_AVX2_VARIANT 0
#endif

namespace lsa_ext {
namespace {

constexpr int64_t kChunk = 32768;          // target elements per work item (forward)
// Backward items cover 2 MiB of each gradient: a fresh huge-page gradient buffer
// (output_buffers.h) is then faulted in (and zeroed by the kernel) one 2 MiB page per item, by one
// thread, instead of two threads meeting on the same page (measured: 12% faster at 2 threads).
constexpr int64_t kBackwardChunkBytes = int64_t(1) << 21;
constexpr int64_t kAlign = 64;             // chunk boundaries are multiples of this
// Total elements (per input) under which one thread does all the work: below ~1M elements the
// second thread's wake-up costs about what it saves (measured on the 2-core dev machine), and
// on a busy machine waiting for it to be scheduled can cost far more.
constexpr int64_t kSerialBelow = 1 << 20;
constexpr int64_t kGroupMax = 256;         // samples per kernel call (stack buffer size)

// (a, b, elements per sample, step between samples, samples, out diff[], out norm[])
using SumsFn = void (*)(const void*, const void*, int64_t, int64_t, int64_t, double*, double*);
// (a, b, grad_a, grad_b, elements per sample, step, samples, grad_diff[], grad_norm[],
//  streaming stores)
using BackwardFn = void (*)(const void*, const void*, void*, void*, int64_t, int64_t, int64_t,
                            const double*, const double*, bool);

struct Kernels {
  SumsFn sums;
  BackwardFn backward;
};

bool cpu_has_avx2() {
#if LSA_HAVE_AVX2_VARIANT
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

// The ISA variant for this call: AVX2 when the CPU has it, unless LSA_EXT_CPU_ISA=generic.
bool use_avx2() {
  if (!cpu_has_avx2()) return false;
  const char* env = std::getenv("LSA_EXT_CPU_ISA");
  return env == nullptr || std::strcmp(env, "generic") != 0;
}

Kernels kernels_for(at::ScalarType t) {
  const bool avx2 = use_avx2();
#if LSA_HAVE_AVX2_VARIANT
#define LSA_PICK(NAME)                                                              \
  return avx2 ? Kernels{cpu::avx2::sums_##NAME, cpu::avx2::backward_##NAME}         \
              : Kernels{cpu::generic::sums_##NAME, cpu::generic::backward_##NAME}
#else
  (void)avx2;
#define LSA_PICK(NAME) return Kernels{cpu::generic::sums_##NAME, cpu::generic::backward_##NAME}
#endif
  switch (t) {
    case at::kFloat:
      LSA_PICK(f32);
    case at::kDouble:
      LSA_PICK(f64);
    case at::kHalf:
      LSA_PICK(f16);
    case at::kBFloat16:
      LSA_PICK(bf16);
    default:
      TORCH_CHECK_TYPE(false, "lsa_ext: unsupported dtype ", t);
  }
#undef LSA_PICK
}

// One work item: whole samples [s0, s1) of a layer, or (part >= 0) the element range [e0, e1)
// of sample s0, whose partial sums go to partials[part].
struct Item {
  int64_t layer;
  int64_t s0, s1;
  int64_t e0, e1;
  int64_t part;
};

struct Layer {
  const char* a;
  const char* b;
  char* ga = nullptr;
  char* gb = nullptr;
  int64_t per_sample;  // elements per sample
  int64_t step;        // elements between consecutive samples
  bool stream = false; // write ga/gb with streaming stores (large outputs)
};

struct Split {        // a sample that spans several items
  int64_t layer, sample;
  int64_t first_part, parts;
};

struct Plan {
  std::vector<Item> items;
  std::vector<Split> splits;
  int64_t parts = 0;
  int64_t total = 0;  // elements per input, all layers
};

Plan make_plan(const std::vector<Layer>& layers, int64_t batch, int64_t chunk = kChunk) {
  Plan p;
  for (int64_t l = 0; l < static_cast<int64_t>(layers.size()); ++l) {
    const int64_t per = layers[l].per_sample;
    p.total += per * batch;
    if (batch == 0) continue;
    if (per <= chunk) {
      const int64_t group = std::max<int64_t>(1, chunk / std::max<int64_t>(per, 1));
      for (int64_t s = 0; s < batch; s += group) {
        p.items.push_back({l, s, std::min(batch, s + group), 0, per, -1});
      }
      continue;
    }
    const int64_t nchunks = (per + chunk - 1) / chunk;
    int64_t len = (per + nchunks - 1) / nchunks;
    len = (len + kAlign - 1) / kAlign * kAlign;
    const int64_t parts = (per + len - 1) / len;
    for (int64_t s = 0; s < batch; ++s) {
      p.splits.push_back({l, s, p.parts, parts});
      for (int64_t c = 0; c < parts; ++c) {
        p.items.push_back({l, s, s + 1, c * len, std::min(per, (c + 1) * len), p.parts++});
      }
    }
  }
  return p;
}

// In a process forked after this library was loaded (DataLoader workers...), the work runs on the
// calling thread: OpenMP (libgomp) thread pools do not survive fork.
bool in_forked_child() {
#if defined(__unix__) || defined(__APPLE__)
  static const pid_t load_pid = getpid();
  return getpid() != load_pid;
#else
  return false;
#endif
}
const bool kInitPid = (in_forked_child(), true);  // records the pid when the library loads

// Threads that ran the last call of this (calling) thread: 1 when it ran serially.
thread_local int last_call_threads = 0;

// Runs fn(item_index) for every item: serially for small work (or in a forked child), else on
// all intra-op threads (at::parallel_for, i.e. PyTorch's OpenMP pool, whose threads are usually
// still spinning from the previous op) pulling items from a shared counter: dynamic scheduling,
// so a thread that starts late simply takes fewer items.
template <class Fn>
void run_items(const Plan& plan, const Fn& fn) {
  const int64_t n = static_cast<int64_t>(plan.items.size());
  const int64_t helpers = std::min<int64_t>(at::get_num_threads(), n) - 1;
  if (plan.total < kSerialBelow || helpers <= 0 || at::in_parallel_region() ||
      in_forked_child()) {
    for (int64_t it = 0; it < n; ++it) fn(it);
    last_call_threads = 1;
    return;
  }
  std::atomic<int64_t> next{0};
  std::atomic<int> entered{0};
  at::parallel_for(0, helpers + 1, 1, [&](int64_t, int64_t) {
    entered.fetch_add(1, std::memory_order_relaxed);
    for (int64_t it = next.fetch_add(1, std::memory_order_relaxed); it < n;
         it = next.fetch_add(1, std::memory_order_relaxed)) {
      fn(it);
    }
  });
  last_call_threads = entered.load();
}

// Same element -> memory offset map: equal strides on every dimension of size > 1.
bool same_dense_layout(const at::Tensor& ref, const at::Tensor& t) {
  if (!t.is_non_overlapping_and_dense()) return false;
  for (int64_t d = 0; d < ref.dim(); ++d) {
    if (ref.size(d) > 1 && ref.stride(d) != t.stride(d)) return false;
  }
  return true;
}

// `t` in the memory layout of the dense tensor `ref` (no copy when it already is).
at::Tensor as_layout_of(const at::Tensor& ref, const at::Tensor& t) {
  if (same_dense_layout(ref, t)) return t;
  return at::empty_like(ref).copy_(t);
}

Layer layer_view(const at::Tensor& a, const at::Tensor& b, int64_t batch) {
  Layer v;
  v.a = static_cast<const char*>(a.const_data_ptr());
  v.b = static_cast<const char*>(b.const_data_ptr());
  v.per_sample = batch == 0 ? 0 : a.numel() / batch;
  v.step = batch > 1 ? a.stride(0) : v.per_sample;
  return v;
}

// Forward for L layers sharing batch size B; returns (diff, norm) of shape [L, B].
std::tuple<at::Tensor, at::Tensor> sq_sums_impl(at::TensorList cleans,
                                                at::TensorList perturbeds) {
  const int64_t batch = cleans[0].size(0);
  const int64_t L = static_cast<int64_t>(cleans.size());
  const auto dtype = cleans[0].scalar_type();
  const int64_t esize = static_cast<int64_t>(c10::elementSize(dtype));
  std::vector<at::Tensor> keep;  // owns any copies made below
  std::vector<Layer> layers(L);
  for (int64_t l = 0; l < L; ++l) {
    at::Tensor a = sample_major_dense(cleans[l]) ? cleans[l] : cleans[l].contiguous();
    at::Tensor b = as_layout_of(a, perturbeds[l]);
    layers[l] = layer_view(a, b, batch);
    keep.push_back(std::move(a));
    keep.push_back(std::move(b));
  }
  const Plan plan = make_plan(layers, batch);
  const Kernels k = kernels_for(dtype);
  const auto acc = acc_type_for(dtype);
  at::Tensor diff = at::empty({L, batch}, cleans[0].options().dtype(acc));
  at::Tensor norm = at::empty({L, batch}, cleans[0].options().dtype(acc));
  std::vector<double> part_d(plan.parts), part_n(plan.parts);

  AT_DISPATCH_FLOATING_TYPES(acc, "lsa_ext_sq_sums_cpu", [&] {
    scalar_t* dp = diff.data_ptr<scalar_t>();
    scalar_t* np = norm.data_ptr<scalar_t>();
    run_items(plan, [&](int64_t it) {
      const Item& item = plan.items[it];
      const Layer& v = layers[item.layer];
      const int64_t off = (item.s0 * v.step + item.e0) * esize;
      const int64_t count = item.s1 - item.s0;
      if (item.part >= 0) {
        k.sums(v.a + off, v.b + off, item.e1 - item.e0, v.step, 1, &part_d[item.part],
               &part_n[item.part]);
        return;
      }
      double d[kGroupMax], n[kGroupMax];
      for (int64_t s0 = 0; s0 < count; s0 += kGroupMax) {
        const int64_t c = std::min(kGroupMax, count - s0);
        k.sums(v.a + off + s0 * v.step * esize, v.b + off + s0 * v.step * esize,
               item.e1 - item.e0, v.step, c, d, n);
        scalar_t* dout = dp + item.layer * batch + item.s0 + s0;
        scalar_t* nout = np + item.layer * batch + item.s0 + s0;
        for (int64_t i = 0; i < c; ++i) {
          dout[i] = static_cast<scalar_t>(d[i]);
          nout[i] = static_cast<scalar_t>(n[i]);
        }
      }
    });
    for (const Split& sp : plan.splits) {
      double d = 0, n = 0;
      for (int64_t c = 0; c < sp.parts; ++c) {
        d += part_d[sp.first_part + c];
        n += part_n[sp.first_part + c];
      }
      dp[sp.layer * batch + sp.sample] = static_cast<scalar_t>(d);
      np[sp.layer * batch + sp.sample] = static_cast<scalar_t>(n);
    }
  });
  return {diff, norm};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> sq_sums_backward_impl(
    const at::Tensor& grad_diff, const at::Tensor& grad_norm, at::TensorList cleans,
    at::TensorList perturbeds) {
  const int64_t batch = cleans[0].size(0);
  const int64_t L = static_cast<int64_t>(cleans.size());
  const auto dtype = cleans[0].scalar_type();
  const int64_t esize = static_cast<int64_t>(c10::elementSize(dtype));
  TORCH_CHECK_VALUE(
      grad_diff.numel() == L * batch && grad_norm.numel() == L * batch,
      "grad_diff and grad_norm must have L * B = ", L * batch, " elements, got ",
      grad_diff.numel(), " and ", grad_norm.numel());
  const at::Tensor gd = grad_diff.to(at::kDouble).contiguous();
  const at::Tensor gn = grad_norm.to(at::kDouble).contiguous();
  const double* gdp = gd.const_data_ptr<double>();
  const double* gnp = gn.const_data_ptr<double>();

  std::vector<at::Tensor> gas(L), gbs(L), keep;
  std::vector<at::Tensor> out_a(L), out_b(L);  // written by the kernel (may be temporaries)
  std::vector<Layer> layers(L);
  for (int64_t l = 0; l < L; ++l) {
    gas[l] = cpu::empty_like_for_write(cleans[l]);
    gbs[l] = cpu::empty_like_for_write(cleans[l]);
    at::Tensor a;
    if (sample_major_dense(gas[l])) {
      a = as_layout_of(gas[l], cleans[l]);
      out_a[l] = gas[l];
      out_b[l] = gbs[l];
    } else {  // e.g. a batch-transposed dense clean: compute contiguous, copy back below
      a = cleans[l].contiguous();
      out_a[l] = cpu::empty_like_for_write(a);
      out_b[l] = cpu::empty_like_for_write(a);
    }
    at::Tensor b = as_layout_of(a, perturbeds[l]);
    layers[l] = layer_view(a, b, batch);
    layers[l].stream = cpu::is_large_output(out_a[l]);
    layers[l].ga = static_cast<char*>(out_a[l].data_ptr());
    layers[l].gb = static_cast<char*>(out_b[l].data_ptr());
    keep.push_back(std::move(a));
    keep.push_back(std::move(b));
  }
  const Plan plan = make_plan(layers, batch, std::max(kChunk, kBackwardChunkBytes / esize));
  const Kernels k = kernels_for(dtype);
  run_items(plan, [&](int64_t it) {
    const Item& item = plan.items[it];
    const Layer& v = layers[item.layer];
    const int64_t off = (item.s0 * v.step + item.e0) * esize;
    const int64_t g = item.layer * batch + item.s0;
    k.backward(v.a + off, v.b + off, v.ga + off, v.gb + off, item.e1 - item.e0, v.step,
               item.s1 - item.s0, gdp + g, gnp + g, v.stream);
  });
  for (int64_t l = 0; l < L; ++l) {
    if (!out_a[l].is_same(gas[l])) {
      gas[l].copy_(out_a[l]);
      gbs[l].copy_(out_b[l]);
    }
  }
  return {gas, gbs};
}

// The relative error from the sums (the op's epilogue, after the reduction): [L, B] like them.
// Elementwise on L * B values (serial: a few hundred ns per thousand samples), so bitwise
// independent of the thread count like the sums.
at::Tensor ratio_epilogue(const at::Tensor& diff, const at::Tensor& norm, const RatioGuard& g) {
  at::Tensor out = at::empty_like(diff);
  AT_DISPATCH_FLOATING_TYPES(diff.scalar_type(), "lsa_ext_ratio_cpu", [&] {
    const scalar_t floor_t = static_cast<scalar_t>(g.floor);
    const scalar_t floor_sq_t = static_cast<scalar_t>(g.floor * g.floor);
    const scalar_t* dp = diff.const_data_ptr<scalar_t>();
    const scalar_t* np = norm.const_data_ptr<scalar_t>();
    scalar_t* rp = out.data_ptr<scalar_t>();
    const int64_t count = diff.numel();
    for (int64_t i = 0; i < count; ++i) {
      rp[i] = guarded_ratio<scalar_t>(dp[i], np[i], floor_t, floor_sq_t, g.clamp_norm);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> relative_error_cpu(const at::Tensor& clean,
                                                                  const at::Tensor& perturbed,
                                                                  double eps) {
  check_pair(clean, perturbed, "");
  const RatioGuard g = ratio_guard(eps, clean.scalar_type());
  auto sums = sq_sums_impl({clean}, {perturbed});
  at::Tensor diff = std::get<0>(sums).squeeze(0);
  at::Tensor norm = std::get<1>(sums).squeeze(0);
  return {ratio_epilogue(diff, norm, g), diff, norm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> relative_error_multi_cpu(
    at::TensorList cleans, at::TensorList perturbeds, double eps) {
  check_lists(cleans, perturbeds);
  const RatioGuard g = ratio_guard(eps, cleans[0].scalar_type());
  auto sums = sq_sums_impl(cleans, perturbeds);
  return {ratio_epilogue(std::get<0>(sums), std::get<1>(sums), g), std::get<0>(sums),
          std::get<1>(sums)};
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
  return sq_sums_impl(cleans, perturbeds);
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
  return sq_sums_backward_impl(grad_diff, grad_norm, cleans, perturbeds);
}

}  // namespace

int cpu_threads_last_call() { return last_call_threads; }

int cpu_openmp_version() {
#ifdef _OPENMP
  return _OPENMP;
#else
  return 0;
#endif
}

TORCH_LIBRARY_IMPL(lsa_ext, CPU, m) {
  m.impl("sq_sums", &sq_sums_cpu);
  m.impl("sq_sums_backward", &sq_sums_backward_cpu);
  m.impl("sq_sums_multi", &sq_sums_multi_cpu);
  m.impl("sq_sums_multi_backward", &sq_sums_multi_backward_cpu);
  m.impl("relative_error", &relative_error_cpu);
  m.impl("relative_error_multi", &relative_error_multi_cpu);
}

}  // namespace lsa_ext
