// CUDA kernels of the relative-error op family: per-sample squared sums, the relative error
// computed from them, and the sums' backward.
//
// Work decomposition (forward and backward alike): every layer's samples are cut into chunks of a
// per-layer size, and each (layer, sample, chunk) is one *work item* handled by one warp. All
// items of all layers form one flat, int64-indexed list, so a multi-layer call is ONE launch of a
// 1-D grid (warps loop over items with a grid stride, so any count fits the grid limit). The chunk
// size depends only on the sample size (at least 8 KiB per operand, at most 8192 chunks per
// sample), so one huge sample (B = 1) is spread over thousands of warps just like many samples.
//
// Forward, stage 1: a warp reads its slice of clean and perturbed once (128-bit loads when both
// pointers and the sample stride are 16-byte aligned, scalar loads otherwise), accumulates in
// float32 (float64 for float64 input) over 4 independent accumulators per lane, and reduces the
// lanes in float64 with a fixed shuffle tree. A sample made of one chunk is written straight to
// the output; otherwise the item writes a float64 partial. Stage 2 (only when some sample has
// several chunks) combines each sample's partials in a fixed order, no atomics: results are
// bitwise reproducible run to run, and a sample's result depends only on its values and on
// whether the vector path applies (alignment), not on the batch size or the other layers.
//
// Ratio (relative_error ops only): one more launch, elementwise over the [L, B] sums, computes
// sqrt(d) / max(sqrt(n), floor) as the CPU epilogue does (guarded_ratio, relative_error.h). Kept
// out of stages 1 and 2: IEEE sqrt and division have slow-path calls whose register demands
// made the sums kernels spill (ptxas), and the sq_sums ops need no ratio.
//
// Backward (fused, one pass): grad_clean = 2 (a - b) gD[i] + 2 a gN[i], grad_perturbed =
// -2 (a - b) gD[i], elementwise with the same item list and vector width; the outputs get the
// strides of the (sample-major dense) inputs.
//
// Layer descriptors travel as a by-value kernel argument for up to kInlineLayers layers; beyond,
// they are copied to the device from a pinned host buffer with a non-blocking copy on the current
// stream (during CUDA graph capture: one by-value launch per kInlineLayers layers instead).
// Nothing in these ops waits for the device.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "relative_error.h"

namespace lsa_ext {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;                      // threads per block
constexpr int kWarpsPerBlock = kThreads / kWarp;   // work items in flight per block
constexpr int kUnroll = 4;                         // independent 16-byte loads per operand per lane
constexpr int kUnrollBwd = 2;                      // the same in the backward (no spills)
constexpr int kVecBytes = 16;                      // 128-bit accesses
constexpr int64_t kMinChunkBytes = 8192;           // smallest chunk, bytes per operand
constexpr int64_t kMaxChunksPerSample = 8192;      // bounds stage 2's work per sample
constexpr int64_t kBlockCombineFrom = 1024;        // stage 2 uses a block (not a warp) per sample
constexpr int kInlineLayers = 32;                  // layer descriptors passed by value
constexpr int64_t kMaxGrid = std::numeric_limits<int32_t>::max();  // gridDim.x limit

// One layer of a call. Plain data: copied into a kernel argument or a device buffer.
struct LayerDesc {
  const void* a;       // clean
  const void* b;       // perturbed (same strides as a)
  void* ga;            // backward outputs (nullptr in the forward)
  void* gb;
  int64_t per_sample;  // elements per sample
  int64_t step;        // elements between the starts of consecutive samples
  int64_t chunk;       // elements per work item (a multiple of kWarp * vector width * kUnroll)
  int64_t chunks;      // work items per sample (>= 1)
  int64_t first_item;  // index of this layer's first work item
  int64_t vec;         // 1: every sample start of every pointer is 16-byte aligned
};

struct InlineTable {
  LayerDesc layer[kInlineLayers];
};
static_assert(sizeof(InlineTable) + 128 <= 4096, "kernel arguments must stay under 4 KiB");

template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) Pack {
  scalar_t v[V];
};

// Explicitly global accesses: the data pointers come out of the layer table, so the compiler
// cannot infer their address space and would otherwise emit generic loads and stores.
template <int kBytes> struct Bits;
template <> struct Bits<2> { using type = unsigned short; };
template <> struct Bits<4> { using type = unsigned int; };
template <> struct Bits<8> { using type = unsigned long long; };
template <> struct Bits<16> { using type = uint4; };

// Read-only (non-coherent) global load; the inputs are never written by these kernels.
template <typename T>
__device__ __forceinline__ T load_ro(const T* p) {
  using B = typename Bits<sizeof(T)>::type;
  const B r = __ldg(reinterpret_cast<const B*>(p));
  T out;
  memcpy(&out, &r, sizeof(T));
  return out;
}

template <typename T>
__device__ __forceinline__ void store(T* p, const T& v) {
  using B = typename Bits<sizeof(T)>::type;
  B r;
  memcpy(&r, &v, sizeof(T));
  __stwb(reinterpret_cast<B*>(p), r);
}

template <typename scalar_t>
constexpr int vec_width() {
  return kVecBytes / static_cast<int>(sizeof(scalar_t));
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;  // complete in lane 0
}

// The layer of item `it`: binary search over first_item (layers are few).
template <bool kInline>
__device__ __forceinline__ int find_layer(const InlineTable& inl, const LayerDesc* table,
                                          int num_layers, int64_t it) {
  int lo = 0, hi = num_layers;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    const int64_t first = kInline ? inl.layer[mid].first_item : table[mid].first_item;
    if (first <= it) lo = mid; else hi = mid;
  }
  return lo;
}

// Sums over `len` elements starting at a, b (a warp; lane `lane`); V elements per access, the
// pointers V-element aligned when V > 1. Lane results in d, n.
template <typename scalar_t, typename acc_t, int V>
__device__ __forceinline__ void sums_range(const scalar_t* __restrict__ a,
                                           const scalar_t* __restrict__ b, int64_t len, int lane,
                                           acc_t& d, acc_t& n) {
  using P = Pack<scalar_t, V>;
  const P* __restrict__ pa = reinterpret_cast<const P*>(a);
  const P* __restrict__ pb = reinterpret_cast<const P*>(b);
  const int64_t nvec = len / V;
  acc_t dd[kUnroll], nn[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) dd[u] = nn[u] = acc_t(0);
  int64_t k = lane;
  for (; k + (kUnroll - 1) * kWarp < nvec; k += kUnroll * kWarp) {
    P xa[kUnroll], xb[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      xa[u] = load_ro(pa + k + u * kWarp);
      xb[u] = load_ro(pb + k + u * kWarp);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const acc_t x = static_cast<acc_t>(xa[u].v[e]);
        const acc_t t = x - static_cast<acc_t>(xb[u].v[e]);
        dd[u] += t * t;
        nn[u] += x * x;
      }
    }
  }
  for (; k < nvec; k += kWarp) {
    const P xa = load_ro(pa + k);
    const P xb = load_ro(pb + k);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const acc_t x = static_cast<acc_t>(xa.v[e]);
      const acc_t t = x - static_cast<acc_t>(xb.v[e]);
      dd[0] += t * t;
      nn[0] += x * x;
    }
  }
  // Tail of fewer than V elements (only in a sample's last chunk).
  for (int64_t j = nvec * V + lane; j < len; j += kWarp) {
    const acc_t x = static_cast<acc_t>(load_ro(a + j));
    const acc_t t = x - static_cast<acc_t>(load_ro(b + j));
    dd[1] += t * t;
    nn[1] += x * x;
  }
  d = (dd[0] + dd[1]) + (dd[2] + dd[3]);
  n = (nn[0] + nn[1]) + (nn[2] + nn[3]);
}

// Stage 1 of the forward: one warp per work item.
template <typename scalar_t, bool kInline>
__global__ void __launch_bounds__(kThreads)
    sq_sums_items_kernel(const InlineTable inl, const LayerDesc* __restrict__ table,
                         int num_layers, int64_t batch, int64_t items,
                         at::opmath_type<scalar_t>* __restrict__ out_d,
                         at::opmath_type<scalar_t>* __restrict__ out_n,
                         double* __restrict__ part_d, double* __restrict__ part_n) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = vec_width<scalar_t>();
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t it = first; it < items; it += stride) {  // warp-uniform
    const int l = find_layer<kInline>(inl, table, num_layers, it);
    const LayerDesc d = kInline ? inl.layer[l] : table[l];
    const int64_t local = it - d.first_item;
    const int64_t i = local / d.chunks;
    const int64_t c = local - i * d.chunks;
    const int64_t start = c * d.chunk;
    const int64_t rest = d.per_sample - start;
    const int64_t len = rest < d.chunk ? rest : d.chunk;  // >= 0
    acc_t sd = acc_t(0), sn = acc_t(0);
    if (len > 0) {
      const int64_t off = i * d.step + start;
      const scalar_t* a = static_cast<const scalar_t*>(d.a) + off;
      const scalar_t* b = static_cast<const scalar_t*>(d.b) + off;
      if (d.vec) {
        sums_range<scalar_t, acc_t, V>(a, b, len, lane, sd, sn);
      } else {
        sums_range<scalar_t, acc_t, 1>(a, b, len, lane, sd, sn);
      }
    }
    const double wd = warp_sum(static_cast<double>(sd));
    const double wn = warp_sum(static_cast<double>(sn));
    if (lane == 0) {
      if (d.chunks == 1) {
        out_d[l * batch + i] = static_cast<acc_t>(wd);
        out_n[l * batch + i] = static_cast<acc_t>(wn);
      } else {
        part_d[it] = wd;
        part_n[it] = wn;
      }
    }
  }
}

// Stage 2 of the forward: kGroup threads (a warp or the block) combine one sample's partials in a
// fixed order. Samples of single-chunk layers were written by stage 1 and are skipped.
template <typename acc_t, int kGroup, bool kInline>
__global__ void __launch_bounds__(kThreads)
    sq_sums_combine_kernel(const InlineTable inl, const LayerDesc* __restrict__ table,
                           int num_layers, int64_t batch, const double* __restrict__ part_d,
                           const double* __restrict__ part_n, acc_t* __restrict__ out_d,
                           acc_t* __restrict__ out_n) {
  static_assert(kGroup == kWarp || kGroup == kThreads, "a warp or the whole block");
  constexpr int kPerBlock = kThreads / kGroup;
  __shared__ double sh_d[kWarpsPerBlock];
  __shared__ double sh_n[kWarpsPerBlock];
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int g = static_cast<int>(threadIdx.x) % kGroup;
  const int64_t pairs = static_cast<int64_t>(num_layers) * batch;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kPerBlock + threadIdx.x / kGroup;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kPerBlock;
  for (int64_t p = first; p < pairs; p += stride) {  // uniform over the group
    const int l = static_cast<int>(p / batch);
    const int64_t i = p - l * batch;
    const int64_t chunks = kInline ? inl.layer[l].chunks : table[l].chunks;
    if (chunks == 1) continue;
    const int64_t base = (kInline ? inl.layer[l].first_item : table[l].first_item) + i * chunks;
    double sd[kUnroll], sn[kUnroll];  // independent loads in flight
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) sd[u] = sn[u] = 0.0;
    int64_t j = g;
    for (; j + (kUnroll - 1) * kGroup < chunks; j += kUnroll * kGroup) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        sd[u] += part_d[base + j + u * kGroup];
        sn[u] += part_n[base + j + u * kGroup];
      }
    }
    for (; j < chunks; j += kGroup) {
      sd[0] += part_d[base + j];
      sn[0] += part_n[base + j];
    }
    double td = warp_sum((sd[0] + sd[1]) + (sd[2] + sd[3]));
    double tn = warp_sum((sn[0] + sn[1]) + (sn[2] + sn[3]));
    if constexpr (kGroup == kWarp) {
      if (lane == 0) {
        out_d[p] = static_cast<acc_t>(td);
        out_n[p] = static_cast<acc_t>(tn);
      }
    } else {
      const int w = static_cast<int>(threadIdx.x) / kWarp;
      if (lane == 0) {
        sh_d[w] = td;
        sh_n[w] = tn;
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        td = 0.0;
        tn = 0.0;
#pragma unroll
        for (int k = 0; k < kWarpsPerBlock; ++k) {
          td += sh_d[k];
          tn += sh_n[k];
        }
        out_d[p] = static_cast<acc_t>(td);
        out_n[p] = static_cast<acc_t>(tn);
      }
      __syncthreads();  // sh_* are reused by the next sample
    }
  }
}

// ratio[p] = sqrt(d[p]) / max(sqrt(n[p]), floor) for p < count (grid-stride).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    ratio_kernel(const acc_t* __restrict__ d, const acc_t* __restrict__ n,
                 acc_t* __restrict__ ratio, int64_t count, acc_t floor_t, acc_t floor_sq_t,
                 bool clamp_norm) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; p < count;
       p += stride) {
    ratio[p] = guarded_ratio<acc_t>(d[p], n[p], floor_t, floor_sq_t, clamp_norm);
  }
}

// Backward over `len` elements (a warp; lane `lane`); V elements per access.
template <typename scalar_t, typename acc_t, int V>
__device__ __forceinline__ void backward_range(const scalar_t* __restrict__ a,
                                               const scalar_t* __restrict__ b,
                                               scalar_t* __restrict__ ga,
                                               scalar_t* __restrict__ gb, int64_t len, int lane,
                                               acc_t two_gd, acc_t two_gn) {
  using P = Pack<scalar_t, V>;
  const P* __restrict__ pa = reinterpret_cast<const P*>(a);
  const P* __restrict__ pb = reinterpret_cast<const P*>(b);
  P* __restrict__ pga = reinterpret_cast<P*>(ga);
  P* __restrict__ pgb = reinterpret_cast<P*>(gb);
  const int64_t nvec = len / V;
  int64_t k = lane;
  for (; k + (kUnrollBwd - 1) * kWarp < nvec; k += kUnrollBwd * kWarp) {
    P xa[kUnrollBwd], xb[kUnrollBwd];
#pragma unroll
    for (int u = 0; u < kUnrollBwd; ++u) {
      xa[u] = load_ro(pa + k + u * kWarp);
      xb[u] = load_ro(pb + k + u * kWarp);
    }
#pragma unroll
    for (int u = 0; u < kUnrollBwd; ++u) {
      P oa, ob;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const acc_t x = static_cast<acc_t>(xa[u].v[e]);
        const acc_t t = (x - static_cast<acc_t>(xb[u].v[e])) * two_gd;
        oa.v[e] = static_cast<scalar_t>(t + x * two_gn);
        ob.v[e] = static_cast<scalar_t>(-t);
      }
      store(pga + k + u * kWarp, oa);
      store(pgb + k + u * kWarp, ob);
    }
  }
  for (; k < nvec; k += kWarp) {
    const P xa = load_ro(pa + k);
    const P xb = load_ro(pb + k);
    P oa, ob;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const acc_t x = static_cast<acc_t>(xa.v[e]);
      const acc_t t = (x - static_cast<acc_t>(xb.v[e])) * two_gd;
      oa.v[e] = static_cast<scalar_t>(t + x * two_gn);
      ob.v[e] = static_cast<scalar_t>(-t);
    }
    store(pga + k, oa);
    store(pgb + k, ob);
  }
  for (int64_t j = nvec * V + lane; j < len; j += kWarp) {
    const acc_t x = static_cast<acc_t>(load_ro(a + j));
    const acc_t t = (x - static_cast<acc_t>(load_ro(b + j))) * two_gd;
    store(ga + j, static_cast<scalar_t>(t + x * two_gn));
    store(gb + j, static_cast<scalar_t>(-t));
  }
}

template <typename scalar_t, bool kInline>
__global__ void __launch_bounds__(kThreads)
    sq_sums_backward_kernel(const InlineTable inl, const LayerDesc* __restrict__ table,
                            int num_layers, int64_t batch, int64_t items,
                            const at::opmath_type<scalar_t>* __restrict__ grad_d,
                            const at::opmath_type<scalar_t>* __restrict__ grad_n) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = vec_width<scalar_t>();
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t it = first; it < items; it += stride) {
    const int l = find_layer<kInline>(inl, table, num_layers, it);
    const LayerDesc d = kInline ? inl.layer[l] : table[l];
    const int64_t local = it - d.first_item;
    const int64_t i = local / d.chunks;
    const int64_t c = local - i * d.chunks;
    const int64_t start = c * d.chunk;
    const int64_t rest = d.per_sample - start;
    const int64_t len = rest < d.chunk ? rest : d.chunk;
    if (len <= 0) continue;
    const acc_t two_gd = acc_t(2) * grad_d[l * batch + i];
    const acc_t two_gn = acc_t(2) * grad_n[l * batch + i];
    const int64_t off = i * d.step + start;
    const scalar_t* a = static_cast<const scalar_t*>(d.a) + off;
    const scalar_t* b = static_cast<const scalar_t*>(d.b) + off;
    scalar_t* ga = static_cast<scalar_t*>(d.ga) + off;
    scalar_t* gb = static_cast<scalar_t*>(d.gb) + off;
    if (d.vec) {
      backward_range<scalar_t, acc_t, V>(a, b, ga, gb, len, lane, two_gd, two_gn);
    } else {
      backward_range<scalar_t, acc_t, 1>(a, b, ga, gb, len, lane, two_gd, two_gn);
    }
  }
}

// ------------------------------------------------------------------------------ host side

inline int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

inline bool aligned(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % kVecBytes == 0;
}

struct Plan {
  std::vector<LayerDesc> layers;
  int64_t batch = 0;
  int64_t items = 0;       // work items over all layers
  int64_t max_chunks = 0;  // largest chunks-per-sample
};

// Plans the work items of sample-major dense pairs (as[l], bs[l]) (and outputs gas/gbs, same
// strides, when given). Chunk sizes depend on the sample size and dtype only.
Plan make_plan(const std::vector<at::Tensor>& as, const std::vector<at::Tensor>& bs,
               const std::vector<at::Tensor>* gas, const std::vector<at::Tensor>* gbs,
               int64_t batch) {
  const int64_t elem = static_cast<int64_t>(as[0].element_size());
  const int64_t width = kVecBytes / elem;
  const int64_t tile = kWarp * width * kUnroll;
  const int64_t min_chunk = ceil_div(std::max<int64_t>(tile, kMinChunkBytes / elem), tile) * tile;
  Plan plan;
  plan.batch = batch;
  plan.layers.resize(as.size());
  for (size_t l = 0; l < as.size(); ++l) {
    LayerDesc& d = plan.layers[l];
    const int64_t per = batch == 0 ? 0 : as[l].numel() / batch;
    d.a = as[l].const_data_ptr();
    d.b = bs[l].const_data_ptr();
    d.ga = gas ? (*gas)[l].data_ptr() : nullptr;
    d.gb = gbs ? (*gbs)[l].data_ptr() : nullptr;
    d.per_sample = per;
    d.step = batch > 1 ? as[l].stride(0) : per;
    const int64_t want = ceil_div(std::max<int64_t>(per, 1), kMaxChunksPerSample);
    d.chunk = std::max(min_chunk, ceil_div(want, tile) * tile);
    d.chunks = std::max<int64_t>(1, ceil_div(per, d.chunk));
    d.first_item = plan.items;
    bool vec = aligned(d.a) && aligned(d.b) && (batch <= 1 || (d.step * elem) % kVecBytes == 0);
    if (gas) vec = vec && aligned(d.ga) && aligned(d.gb);
    d.vec = vec ? 1 : 0;
    plan.items += d.chunks * batch;
    plan.max_chunks = std::max(plan.max_chunks, d.chunks);
  }
  return plan;
}

// One kernel launch over a run of layers [layer0, layer0 + num_layers) whose items are
// [item0, item0 + items) of the plan; the kernels see layer and item indices relative to these.
struct Launch {
  InlineTable inl;
  const LayerDesc* table = nullptr;  // device copy of the descriptors, when not inline
  bool is_inline = true;
  int num_layers = 0;
  int64_t layer0 = 0;
  int64_t item0 = 0;
  int64_t items = 0;
  int64_t max_chunks = 0;
};

// Splits a plan into launches. Normally ONE launch: the descriptors travel by value when at most
// kInlineLayers, else as a device copy made without host synchronisation (pinned staging buffer,
// non-blocking copy on the current stream; the caching host allocator keeps the staging buffer
// until the copy has run; `keep` holds the device copy until the launch is queued). While the
// stream is being captured into a CUDA graph, a host-to-device copy would be replayed from a
// staging buffer that may since have been reused, so many layers then take one by-value launch
// per kInlineLayers layers instead.
std::vector<Launch> make_launches(const Plan& plan, const at::Device& device, at::Tensor& keep) {
  const int64_t n = static_cast<int64_t>(plan.layers.size());
  std::vector<Launch> out;
  const bool capturing =
      n > kInlineLayers &&
      c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  if (n > kInlineLayers && !capturing) {
    const int64_t bytes = n * static_cast<int64_t>(sizeof(LayerDesc));
    at::Tensor host =
        at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.data_ptr(), plan.layers.data(), static_cast<size_t>(bytes));
    keep = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
    keep.copy_(host, /*non_blocking=*/true);
    Launch g;
    std::memset(&g.inl, 0, sizeof(g.inl));
    g.table = reinterpret_cast<const LayerDesc*>(keep.const_data_ptr());
    g.is_inline = false;
    g.num_layers = static_cast<int>(n);
    g.items = plan.items;
    g.max_chunks = plan.max_chunks;
    out.push_back(g);
    return out;
  }
  for (int64_t l0 = 0; l0 < n; l0 += kInlineLayers) {
    Launch g;
    std::memset(&g.inl, 0, sizeof(g.inl));
    g.num_layers = static_cast<int>(std::min<int64_t>(kInlineLayers, n - l0));
    g.layer0 = l0;
    g.item0 = plan.layers[l0].first_item;
    for (int k = 0; k < g.num_layers; ++k) {
      LayerDesc d = plan.layers[l0 + k];
      d.first_item -= g.item0;
      g.items += d.chunks * plan.batch;
      g.max_chunks = std::max(g.max_chunks, d.chunks);
      g.inl.layer[k] = d;
    }
    out.push_back(g);
  }
  return out;
}

inline unsigned grid_for(int64_t units, int64_t per_block) {
  return static_cast<unsigned>(std::min(ceil_div(units, per_block), kMaxGrid));
}

// Forward for L layers sharing batch size B; returns (diff, norm) of shape [L, B].
std::tuple<at::Tensor, at::Tensor> sq_sums_impl(std::vector<at::Tensor> as,
                                                std::vector<at::Tensor> bs) {
  const c10::cuda::CUDAGuard guard(as[0].device());
  const int64_t batch = as[0].size(0);
  const int L = static_cast<int>(as.size());
  const auto dtype = as[0].scalar_type();
  const auto acc = acc_type_for(dtype);
  for (int l = 0; l < L; ++l) {
    auto p = same_layout(as[l], bs[l]);
    as[l] = p.first;
    bs[l] = p.second;
  }
  const auto opts = as[0].options().dtype(acc);
  at::Tensor diff = at::empty({L, batch}, opts);
  at::Tensor norm = at::empty({L, batch}, opts);
  if (batch == 0) return {diff, norm};

  const Plan plan = make_plan(as, bs, nullptr, nullptr, batch);
  at::Tensor keep;
  const std::vector<Launch> launches = make_launches(plan, as[0].device(), keep);
  at::Tensor partials;
  if (plan.max_chunks > 1) partials = at::empty({2, plan.items}, opts.dtype(at::kDouble));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lsa_ext_sq_sums_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (const Launch& g : launches) {
      acc_t* od = diff.data_ptr<acc_t>() + g.layer0 * batch;
      acc_t* on = norm.data_ptr<acc_t>() + g.layer0 * batch;
      double* pd = g.max_chunks > 1 ? partials.data_ptr<double>() + g.item0 : nullptr;
      double* pn = g.max_chunks > 1 ? partials.data_ptr<double>() + plan.items + g.item0 : nullptr;
      const unsigned grid1 = grid_for(g.items, kWarpsPerBlock);
      if (g.is_inline) {
        sq_sums_items_kernel<scalar_t, true><<<grid1, kThreads, 0, stream>>>(
            g.inl, g.table, g.num_layers, batch, g.items, od, on, pd, pn);
      } else {
        sq_sums_items_kernel<scalar_t, false><<<grid1, kThreads, 0, stream>>>(
            g.inl, g.table, g.num_layers, batch, g.items, od, on, pd, pn);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (g.max_chunks <= 1) continue;
      const int64_t pairs = static_cast<int64_t>(g.num_layers) * batch;
      if (g.max_chunks >= kBlockCombineFrom) {
        const unsigned grid2 = grid_for(pairs, 1);
        if (g.is_inline) {
          sq_sums_combine_kernel<acc_t, kThreads, true><<<grid2, kThreads, 0, stream>>>(
              g.inl, g.table, g.num_layers, batch, pd, pn, od, on);
        } else {
          sq_sums_combine_kernel<acc_t, kThreads, false><<<grid2, kThreads, 0, stream>>>(
              g.inl, g.table, g.num_layers, batch, pd, pn, od, on);
        }
      } else {
        const unsigned grid2 = grid_for(pairs, kWarpsPerBlock);
        if (g.is_inline) {
          sq_sums_combine_kernel<acc_t, kWarp, true><<<grid2, kThreads, 0, stream>>>(
              g.inl, g.table, g.num_layers, batch, pd, pn, od, on);
        } else {
          sq_sums_combine_kernel<acc_t, kWarp, false><<<grid2, kThreads, 0, stream>>>(
              g.inl, g.table, g.num_layers, batch, pd, pn, od, on);
        }
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {diff, norm};
}

// The relative error from finished sums (same shape and dtype), on the current stream.
at::Tensor ratio_impl(const at::Tensor& diff, const at::Tensor& norm, const RatioGuard& rg) {
  const c10::cuda::CUDAGuard guard(diff.device());
  at::Tensor ratio = at::empty_like(diff);
  const int64_t count = diff.numel();
  if (count == 0) return ratio;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(diff.scalar_type(), "lsa_ext_ratio_cuda", [&] {
    ratio_kernel<scalar_t><<<grid_for(count, kThreads), kThreads, 0, stream>>>(
        diff.const_data_ptr<scalar_t>(), norm.const_data_ptr<scalar_t>(),
        ratio.data_ptr<scalar_t>(), count, static_cast<scalar_t>(rg.floor),
        static_cast<scalar_t>(rg.floor * rg.floor), rg.clamp_norm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return ratio;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> sq_sums_backward_impl(
    const at::Tensor& grad_diff, const at::Tensor& grad_norm, std::vector<at::Tensor> as,
    std::vector<at::Tensor> bs) {
  const c10::cuda::CUDAGuard guard(as[0].device());
  const std::vector<at::Tensor> cleans_in = as;
  const int64_t batch = as[0].size(0);
  const int L = static_cast<int>(as.size());
  const auto dtype = as[0].scalar_type();
  const auto acc = acc_type_for(dtype);
  TORCH_CHECK_VALUE(
      grad_diff.numel() == L * batch && grad_norm.numel() == L * batch,
      "grad_diff and grad_norm must have L * B = ", L * batch, " elements, got ",
      grad_diff.numel(), " and ", grad_norm.numel());
  TORCH_CHECK_VALUE(
      grad_diff.device() == as[0].device() && grad_norm.device() == as[0].device(),
      "grad_diff and grad_norm must be on the inputs' device ", as[0].device(), ", got ",
      grad_diff.device(), " and ", grad_norm.device());
  const at::Tensor gd = grad_diff.to(acc).contiguous();
  const at::Tensor gn = grad_norm.to(acc).contiguous();
  std::vector<at::Tensor> gas(L), gbs(L);
  // Dense inputs that are not sample-major (e.g. a transposed [B, C]) are computed in a contiguous
  // copy; their gradients are copied back to at::empty_like(clean)'s layout at the end, which is
  // what the fake kernel and the CPU kernel return.
  std::vector<bool> relayout(L);
  int64_t numel = 0;
  for (int l = 0; l < L; ++l) {
    relayout[l] = as[l].is_non_overlapping_and_dense() && !sample_major_dense(as[l]);
    auto p = same_layout(as[l], bs[l]);
    as[l] = p.first;
    bs[l] = p.second;
    gas[l] = at::empty_like(as[l]);
    gbs[l] = at::empty_like(as[l]);
    TORCH_INTERNAL_ASSERT(gas[l].strides() == as[l].strides());
    numel += as[l].numel();
  }
  if (numel == 0) return {gas, gbs};

  const Plan plan = make_plan(as, bs, &gas, &gbs, batch);
  at::Tensor keep;
  const std::vector<Launch> launches = make_launches(plan, as[0].device(), keep);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lsa_ext_sq_sums_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (const Launch& g : launches) {
      const acc_t* gdp = gd.const_data_ptr<acc_t>() + g.layer0 * batch;
      const acc_t* gnp = gn.const_data_ptr<acc_t>() + g.layer0 * batch;
      const unsigned grid = grid_for(g.items, kWarpsPerBlock);
      if (g.is_inline) {
        sq_sums_backward_kernel<scalar_t, true><<<grid, kThreads, 0, stream>>>(
            g.inl, g.table, g.num_layers, batch, g.items, gdp, gnp);
      } else {
        sq_sums_backward_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(
            g.inl, g.table, g.num_layers, batch, g.items, gdp, gnp);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  for (int l = 0; l < L; ++l) {
    if (relayout[l]) {
      gas[l] = at::empty_like(cleans_in[l]).copy_(gas[l]);
      gbs[l] = at::empty_like(cleans_in[l]).copy_(gbs[l]);
    }
  }
  return {gas, gbs};
}

std::tuple<at::Tensor, at::Tensor> sq_sums_cuda(const at::Tensor& clean,
                                                const at::Tensor& perturbed) {
  check_pair(clean, perturbed, "");
  auto out = sq_sums_impl({clean}, {perturbed});
  return {std::get<0>(out).squeeze(0), std::get<1>(out).squeeze(0)};
}

std::tuple<at::Tensor, at::Tensor> sq_sums_multi_cuda(at::TensorList cleans,
                                                      at::TensorList perturbeds) {
  check_lists(cleans, perturbeds);
  return sq_sums_impl(cleans.vec(), perturbeds.vec());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> relative_error_cuda(const at::Tensor& clean,
                                                                   const at::Tensor& perturbed,
                                                                   double eps) {
  check_pair(clean, perturbed, "");
  const RatioGuard rg = ratio_guard(eps, clean.scalar_type());
  auto sums = sq_sums_impl({clean}, {perturbed});
  at::Tensor diff = std::get<0>(sums).squeeze(0);
  at::Tensor norm = std::get<1>(sums).squeeze(0);
  return {ratio_impl(diff, norm, rg), diff, norm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> relative_error_multi_cuda(
    at::TensorList cleans, at::TensorList perturbeds, double eps) {
  check_lists(cleans, perturbeds);
  const RatioGuard rg = ratio_guard(eps, cleans[0].scalar_type());
  auto sums = sq_sums_impl(cleans.vec(), perturbeds.vec());
  return {ratio_impl(std::get<0>(sums), std::get<1>(sums), rg), std::get<0>(sums),
          std::get<1>(sums)};
}

std::tuple<at::Tensor, at::Tensor> sq_sums_backward_cuda(const at::Tensor& grad_diff,
                                                         const at::Tensor& grad_norm,
                                                         const at::Tensor& clean,
                                                         const at::Tensor& perturbed) {
  check_pair(clean, perturbed, "");
  auto out = sq_sums_backward_impl(grad_diff, grad_norm, {clean}, {perturbed});
  return {std::get<0>(out)[0], std::get<1>(out)[0]};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> sq_sums_multi_backward_cuda(
    const at::Tensor& grad_diff, const at::Tensor& grad_norm, at::TensorList cleans,
    at::TensorList perturbeds) {
  check_lists(cleans, perturbeds);
  return sq_sums_backward_impl(grad_diff, grad_norm, cleans.vec(), perturbeds.vec());
}

}  // namespace

TORCH_LIBRARY_IMPL(lsa_ext, CUDA, m) {
  m.impl("sq_sums", &sq_sums_cuda);
  m.impl("sq_sums_backward", &sq_sums_backward_cuda);
  m.impl("sq_sums_multi", &sq_sums_multi_cuda);
  m.impl("sq_sums_multi_backward", &sq_sums_multi_backward_cuda);
  m.impl("relative_error", &relative_error_cuda);
  m.impl("relative_error_multi", &relative_error_multi_cuda);
}

}  // namespace lsa_ext
