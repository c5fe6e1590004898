// Fused sampling over the vocabulary: temperature, top-k and top-p without sorting.
//
// One thread block per row. Thresholds are found exactly by a bitwise search over the
// order-preserving 32-bit keys of the scaled logits (x = logit / T): top-k looks for the largest
// key t with count(key >= t) >= k (that is the k-th largest value), top-p for the largest key t
// with mass(key >= t) >= p * M_k. The row is staged in shared memory when it fits, else every pass
// re-reads it (from L2 in practice). Sampling then walks the kept mass in vocabulary order with a
// uniform drawn from a counter-based hash of (seed, offset). All reductions run in a fixed order,
// so a row's result does not depend on the rest of the batch. The definitions match the torch
// reference in vinekernels/sampling.py.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <climits>
#include <math.h>

#include "sampling.h"

namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

// splitmix64 finaliser; the torch reference computes the same bits with wrapping int64 math.
__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

__device__ __forceinline__ float uniform_from_seed(int64_t seed, int64_t offset) {
  const uint64_t h = mix64(mix64(static_cast<uint64_t>(seed) + kGolden) +
                           static_cast<uint64_t>(offset));
  return static_cast<float>(h >> 40) * (1.0f / 16777216.0f);  // 24 bits, exact in float32
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Monotone map from float to uint32 (for non-NaN values): a < b  <=>  key(a) < key(b).
__device__ __forceinline__ uint32_t order_key(float x) {
  uint32_t b = __float_as_uint(x);
  if (b == 0x80000000u) b = 0u;  // -0 == +0 as values, so give them one key
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// ---------------------------------------------------------------- fixed-order block collectives
// Butterfly (xor) reductions leave every lane with the same bits (addition is commutative), and
// the cross-warp step always combines warps in the same order: results are reproducible.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

template <typename T>
__device__ T block_sum(T v, T* buf) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < nwarps ? buf[lane] : T(0);
    w = warp_sum(w);
    if (lane == 0) buf[kWarp] = w;
  }
  __syncthreads();
  const T r = buf[kWarp];
  __syncthreads();  // buf may be reused right away
  return r;
}

template <typename T>
__device__ T block_max(T v, T* buf, T identity) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  v = warp_max(v);
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < nwarps ? buf[lane] : identity;
    w = warp_max(w);
    if (lane == 0) buf[kWarp] = w;
  }
  __syncthreads();
  const T r = buf[kWarp];
  __syncthreads();
  return r;
}

// Maximum value, lowest index among equal maxima.
__device__ __forceinline__ void argmax_step(float& v, int& i, float ov, int oi) {
  if (ov > v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}

__device__ void block_argmax(float& v, int& i, float* fbuf, int* ibuf) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(kFullMask, v, o);
    const int oi = __shfl_xor_sync(kFullMask, i, o);
    argmax_step(v, i, ov, oi);
  }
  if (lane == 0) {
    fbuf[warp] = v;
    ibuf[warp] = i;
  }
  __syncthreads();
  if (warp == 0) {
    float w = lane < nwarps ? fbuf[lane] : -INFINITY;
    int wi = lane < nwarps ? ibuf[lane] : INT_MAX;
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(kFullMask, w, o);
      const int oi = __shfl_xor_sync(kFullMask, wi, o);
      argmax_step(w, wi, ov, oi);
    }
    if (lane == 0) {
      fbuf[kWarp] = w;
      ibuf[kWarp] = wi;
    }
  }
  __syncthreads();
  v = fbuf[kWarp];
  i = ibuf[kWarp];
  __syncthreads();
}

// Exclusive prefix sum over threads in thread order; *total receives the block sum.
__device__ float block_exclusive_scan(float v, float* buf, float* total) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  float incl = v;
#pragma unroll
  for (int o = 1; o < kWarp; o <<= 1) {
    const float n = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += n;
  }
  float excl = __shfl_up_sync(kFullMask, incl, 1);
  if (lane == 0) excl = 0.f;
  if (lane == kWarp - 1) buf[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const float w = lane < nwarps ? buf[lane] : 0.f;
    float wincl = w;
#pragma unroll
    for (int o = 1; o < kWarp; o <<= 1) {
      const float n = __shfl_up_sync(kFullMask, wincl, o);
      if (lane >= o) wincl += n;
    }
    float wexcl = __shfl_up_sync(kFullMask, wincl, 1);
    if (lane == 0) wexcl = 0.f;
    __syncwarp();
    buf[lane] = wexcl;
    if (lane == kWarp - 1) buf[kWarp] = wincl;
  }
  __syncthreads();
  const float r = buf[warp] + excl;
  *total = buf[kWarp];
  __syncthreads();
  return r;
}

// ---------------------------------------------------------------- the kernel
template <typename T, bool kCached>
__global__ void __launch_bounds__(kMaxThreads, 1)
    sample_kernel(const T* __restrict__ logits, int64_t row_stride, int vocab,
                  const float* __restrict__ temperature, const int32_t* __restrict__ top_k,
                  const float* __restrict__ top_p, const int64_t* __restrict__ seeds,
                  const int64_t* __restrict__ offsets, int64_t* __restrict__ tokens,
                  float* __restrict__ logprobs) {
  extern __shared__ float cache[];  // the row's scaled logits, when kCached
  __shared__ float fbuf[kWarp + 1];
  __shared__ uint32_t ubuf[kWarp + 1];
  __shared__ int ibuf[kWarp + 1];

  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x, nt = blockDim.x;
  const T* in = logits + row * row_stride;
  const float temp = temperature[row];
  const bool greedy = temp == 0.f;
  const float t_eff = greedy ? 1.f : temp;

  auto load = [&](int i) -> float {
    if constexpr (kCached) {
      return cache[i];
    } else {
      return __fdiv_rn(to_float(in[i]), t_eff);
    }
  };

  // Pass 1: scale, stage, validate, max / argmax / min.
  float best = -INFINITY;
  int best_i = INT_MAX;
  uint32_t kmin = 0xffffffffu, bad = 0u;
  for (int i = tid; i < vocab; i += nt) {
    const float x = __fdiv_rn(to_float(in[i]), t_eff);
    if constexpr (kCached) cache[i] = x;
    if (isnan(x) || x == INFINITY) bad = 1u;
    else kmin = min(kmin, order_key(x));
    if (x > best) {
      best = x;
      best_i = i;
    }
  }
  block_argmax(best, best_i, fbuf, ibuf);
  bad = block_sum(bad, ubuf);
  kmin = 0xffffffffu - block_max(0xffffffffu - kmin, ubuf, 0u);
  const float xmax = best;
  if (bad != 0u || xmax == -INFINITY) {
    if (tid == 0) {
      tokens[row] = -1;
      logprobs[row] = __int_as_float(0x7fc00000);  // NaN
    }
    return;
  }
  const uint32_t kmax = order_key(xmax);

  auto kept_mass = [&](uint32_t threshold) -> float {
    float s = 0.f;
    for (int i = tid; i < vocab; i += nt) {
      const float x = load(i);
      if (order_key(x) >= threshold) s += expf(x - xmax);
    }
    return block_sum(s, fbuf);
  };

  if (greedy) {
    const float mass = kept_mass(0u);
    if (tid == 0) {
      tokens[row] = best_i;
      logprobs[row] = -logf(mass);
    }
    return;
  }

  // top-k: the largest key t with count(key >= t) >= k is the k-th largest value's key.
  uint32_t thr = 0u;
  const int k = top_k[row];
  if (k == 1) {
    thr = kmax;
  } else if (k > 1 && k < vocab) {
    uint32_t t = 0u;
    for (int bit = 31; bit >= 0; --bit) {
      const uint32_t cand = t | (1u << bit);
      if (cand > kmax) continue;  // count would be 0 < k
      if (cand <= kmin) {         // count would be vocab >= k
        t = cand;
        continue;
      }
      uint32_t c = 0u;
      for (int i = tid; i < vocab; i += nt) c += order_key(load(i)) >= cand ? 1u : 0u;
      if (block_sum(c, ubuf) >= static_cast<uint32_t>(k)) t = cand;
    }
    thr = t;
  }

  // top-p within the top-k set: the largest key t whose kept mass still reaches p * M_k.
  const float p = top_p[row];
  if (p < 1.f) {
    const float target = p * kept_mass(thr);
    const uint32_t floor_key = max(thr, kmin);
    uint32_t t = 0u;
    for (int bit = 31; bit >= 0; --bit) {
      const uint32_t cand = t | (1u << bit);
      if (cand > kmax) continue;  // mass would be 0 < target
      if (cand <= floor_key) {    // mass would be M_k >= target
        t = cand;
        continue;
      }
      if (kept_mass(cand) >= target) t = cand;
    }
    thr = max(t, thr);
  }

  // Sampling: each thread owns a contiguous slice so the kept mass is walked in vocabulary order.
  const int seg = (vocab + nt - 1) / nt;
  const int stride = kCached ? (seg | 1) : seg;  // odd stride: conflict-free shared memory reads
  const int lo = min(vocab, tid * stride), hi = min(vocab, lo + stride);
  float s = 0.f;
  for (int i = lo; i < hi; ++i) {
    const float x = load(i);
    if (order_key(x) >= thr) s += expf(x - xmax);
  }
  float total;
  const float prefix = block_exclusive_scan(s, fbuf, &total);
  const float target = uniform_from_seed(seeds[row], offsets[row]) * total;
  // The owner is the last thread with mass whose prefix does not pass the target; the first
  // thread with mass has prefix 0, so there always is one.
  const int owner = block_max((s > 0.f && prefix <= target) ? tid : -1, ibuf, -1);
  if (tid == owner) {
    const float local = target - prefix;
    float run = 0.f;
    int tok = -1, last = -1;
    for (int i = lo; i < hi; ++i) {
      const float x = load(i);
      if (order_key(x) < thr) continue;
      const float e = expf(x - xmax);
      if (e > 0.f) {
        last = i;
        run += e;
        if (run > local) {
          tok = i;
          break;
        }
      }
    }
    if (tok < 0) tok = last;  // rounding left the target at the slice's end
    tokens[row] = tok;
    logprobs[row] = (load(tok) - xmax) - logf(total);
  }
}

template <typename T>
cudaError_t launch(const T* logits, int64_t num_rows, int vocab, int64_t row_stride,
                   const float* temperature, const int32_t* top_k, const float* top_p,
                   const int64_t* seeds, const int64_t* offsets, int64_t* tokens,
                   float* logprobs, cudaStream_t stream) {
  // The block size depends on the vocabulary only, so a row's reduction order (and result) is
  // the same in every batch.
  const int threads = vocab >= 16384 ? 1024 : (vocab >= 2048 ? 256 : 128);
  int device = 0, max_smem = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  const size_t bytes = static_cast<size_t>(vocab) * sizeof(float);
  const size_t static_bytes = 3 * (kWarp + 1) * sizeof(float) + 256;
  const dim3 grid(static_cast<unsigned>(num_rows));
  if (bytes + static_bytes <= static_cast<size_t>(max_smem)) {
    err = cudaFuncSetAttribute(sample_kernel<T, true>,
                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(bytes));
    if (err != cudaSuccess) return err;
    sample_kernel<T, true><<<grid, threads, bytes, stream>>>(
        logits, row_stride, vocab, temperature, top_k, top_p, seeds, offsets, tokens, logprobs);
  } else {
    sample_kernel<T, false><<<grid, threads, 0, stream>>>(
        logits, row_stride, vocab, temperature, top_k, top_p, seeds, offsets, tokens, logprobs);
  }
  return cudaGetLastError();
}

}  // namespace

extern "C" int vk_sample_tokens(const void* logits, int dtype, int64_t num_rows, int64_t vocab,
                                int64_t row_stride, const float* temperature,
                                const int32_t* top_k, const float* top_p, const int64_t* seeds,
                                const int64_t* offsets, int64_t* tokens, float* logprobs,
                                void* stream) {
  if (num_rows == 0) return cudaSuccess;
  if (num_rows < 0 || num_rows > INT_MAX || vocab <= 0 || vocab > INT_MAX) {
    return cudaErrorInvalidValue;
  }
  const int v = static_cast<int>(vocab);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case VK_FLOAT32:
      return launch(static_cast<const float*>(logits), num_rows, v, row_stride, temperature,
                    top_k, top_p, seeds, offsets, tokens, logprobs, s);
    case VK_FLOAT16:
      return launch(static_cast<const __half*>(logits), num_rows, v, row_stride, temperature,
                    top_k, top_p, seeds, offsets, tokens, logprobs, s);
    case VK_BFLOAT16:
      return launch(static_cast<const __nv_bfloat16*>(logits), num_rows, v, row_stride,
                    temperature, top_k, top_p, seeds, offsets, tokens, logprobs, s);
    default:
      return cudaErrorInvalidValue;
  }
}
