// normlab's CPU kernels for the norm layers (float32, float64, bfloat16 storage; NCHW and channels_last).
//
// Every norm reduces to per-(sample, channel) work on a 4-D tensor:
//   sums   forward:  s1[n,c] = sum_hw (x - k),  s2[n,c] = sum_hw (x - k)^2   (k: one value of the channel
//                                                                         (BN) or of the group (GN))
//          backward: s1[n,c] = sum_hw dy,       s2[n,c] = sum_hw dy*(x - mean)
//          shifted / centred value by value, so no float run sum cancels for large-mean inputs
//   affine y = x * scale[n,c] + shift[n,c]                  (forward)
//   grad   dx = a[n,c] * dy + b[n,c] * x + k[n,c]           (backward)
// Batch-Instance Norm and the spec engine (normlab/norms/sweeps.py) use the sums with per-(sample, channel)
// shifts / centres and the two per-(n, c) loops (nc_sums, with the fused ReLU's mask in backward; nc_affine:
// centred on a per-(n, c) value, + residual and ReLU; dx centred, b[n,c] * (x - mean_IN[n,c])); BIN's small
// per-(n, c) math is done here too, in double, two calls per direction (bin_moments, bin_scale; bin_grad_sums,
// bin_grad_coefs).
// BatchNorm sums over n and broadcasts per-channel coefficients (split in two calls so DDP can
// all-reduce the sums in between); Group/Layer/Instance norm sums over the channels of a group and is
// blocked per (sample, group) so statistics and affine run while the block is in cache. The small
// per-channel / per-group math is done here too, in double. One pass per sweep over the big tensor:
// the BN forward reads x twice (sums, affine) -- one pass fewer than PyTorch's native CPU batch norm.
//
// BatchNorm + ReLU (+ residual), the ResNet block's "relu(bn(x) [+ r])": the affine pass adds r and clamps
// at 0 as it writes y; in backward the sums pass masks dy with (y > 0) and writes the masked gradient g
// (which is also the residual's gradient), and the dx pass runs on g. Three memory-bound ops (ReLU, add,
// ReLU backward) and their passes over the tensor disappear. Group/Layer/Instance norm fuse the same way.
//
// Layouts: "rows" = NCHW contiguous, viewed as N*C rows of H*W values; "nhwc" = channels_last,
// viewed as N blocks of H*W rows of C values. Sums are accumulated in float/double over short runs
// with several independent accumulators and combined in double. Threads: OpenMP, the same runtime
// (libgomp) and thread count PyTorch uses. Built by normlab/norms/_kernels.py with the system C++
// compiler and called through ctypes; no PyTorch headers needed.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

using i64 = int64_t;

// Storage types S of the big tensors: float, double, and bfloat16 (autocast on CPU), which is computed in
// float: T = Compute<S>::T. ld() widens a stored value, st<S>() rounds a computed one (to nearest even).
struct bf16 {
  uint16_t bits;
};
template <typename S>
struct Compute {
  using T = S;
};
template <>
struct Compute<bf16> {
  using T = float;
};
static inline float ld(float v) { return v; }
static inline double ld(double v) { return v; }
static inline float ld(bf16 v) {
  const uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <typename S>
static inline S st(typename Compute<S>::T v) {
  return S(v);
}
template <>
inline bf16 st<bf16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40u)};  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(u >> 16)};
}

static const i64 kParallelMin = 1 << 15;  // elements below which threads cost more than they save

// Vector helpers for float and bfloat16 storage (GCC/Clang vector extensions: 512-bit where the CPU has it,
// split into narrower instructions elsewhere): 16 values widened to float, stored back exactly, masked.
typedef float vf16 __attribute__((vector_size(64), aligned(4)));
typedef uint32_t vu16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi16 __attribute__((vector_size(64), aligned(4)));
typedef uint16_t vh16 __attribute__((vector_size(32), aligned(2)));

static inline vf16 vload(const float* p) {
  vf16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
static inline vf16 vload(const bf16* p) {
  vh16 h;
  std::memcpy(&h, p, sizeof h);
  const vu16 u = __builtin_convertvector(h, vu16) << 16;
  vf16 v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
static inline void vstore_exact(float* p, vf16 v) { std::memcpy(p, &v, sizeof v); }
static inline void vstore_exact(bf16* p, vf16 v) {  // v holds stored bfloat16 values or 0: exact truncation
  vu16 u;
  std::memcpy(&u, &v, sizeof u);
  const vh16 h = __builtin_convertvector(u >> 16, vh16);
  std::memcpy(p, &h, sizeof h);
}
// The sum of a vector's 16 values, as a tree (4 dependent adds, not 15).
static inline float hsum(vf16 v) {
  float t[16];
  std::memcpy(t, &v, sizeof t);
  for (int w = 8; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) t[l] += t[l + w];
  return t[0];
}
// a, with MASK: g = a * (m > 0), written to pg, as masked() does for one value.
template <typename S, bool MASK>
static inline vf16 vmasked(const S* pa, const S* pm, S* pg) {
  vf16 v = vload(pa);
  if (MASK) {
    const vi16 keep = vload(pm) > 0.0f;  // all ones where m > 0
    vi16 bits;
    std::memcpy(&bits, &v, sizeof bits);
    bits &= keep;
    std::memcpy(&v, &bits, sizeof v);
    vstore_exact(pg, v);
  }
  return v;
}

// Sum and dot product of one contiguous run, with independent accumulators (several vector registers, so
// the adds do not wait on each other's latency: explicit vectors for float and bfloat16, L lanes for
// double), in T; the caller combines runs in double.
// MASK: a is replaced by g = a * (m > 0), which is written to pg (ReLU's backward fused into the norm's).
template <typename S, bool MASK, typename T = typename Compute<S>::T>
static inline T masked(const S* pa, const S* pm, S* pg, i64 i) {
  if (!MASK) return ld(pa[i]);
  const T v = ld(pm[i]) > T(0) ? ld(pa[i]) : T(0);
  pg[i] = st<S>(v);  // exact: v is a stored value or 0
  return v;
}

// Shifted sums, for the 16 values at offset o (MASK as in vmasked), with k the shift of each value's channel:
// SAME (forward): acc1 += a - k, acc2 += (a - k)^2; otherwise (backward): acc1 += a, acc2 += a * (b - k).
// With k one value of the channel (forward) or its mean (backward), no float run sum cancels for inputs
// whose mean is large relative to their spread (E[x^2] - E[x]^2 of plain float sums lost ~1e-7*(mean/std)^2).
template <typename S, bool SAME, bool MASK>
static inline void vaccumulate(vf16& acc1, vf16& acc2, const S* a, const S* b, const S* m, S* g, i64 o, vf16 k) {
  if (SAME) {
    const vf16 x = vload(a + o) - k;
    acc1 += x;
    acc2 += x * x;
  } else {
    const vf16 x = vmasked<S, MASK>(a + o, MASK ? m + o : nullptr, MASK ? g + o : nullptr);
    acc1 += x;
    acc2 += x * (vload(b + o) - k);
  }
}

// The scalar form of vaccumulate, for value i: the two terms added to the sums.
template <typename S, bool SAME, bool MASK, typename T = typename Compute<S>::T>
static inline void shifted(const S* pa, const S* pb, const S* pm, S* pg, i64 i, T k, T& t1, T& t2) {
  if (SAME) {
    t1 = ld(pa[i]) - k;
    t2 = t1 * t1;
  } else {
    t1 = masked<S, MASK>(pa, pm, pg, i);
    t2 = t1 * (ld(pb[i]) - k);
  }
}

template <typename S, bool SAME, bool MASK = false, typename T = typename Compute<S>::T>
static inline void run_sums(const S* pa, const S* pb, i64 len, T k, T& out1, T& out2, const S* pm = nullptr,
                            S* pg = nullptr) {
  if constexpr (!std::is_same_v<S, double>) {
    // float / bfloat16: two vectors of 16 accumulators per sum, explicit, and one tree reduction at the end.
    // (The lane loop, still used for double, leaves short runs -- an 8x8 map's 64 values in a ResNet's last
    // stage -- to a reduction that costs as much as the run.)
    vf16 a1 = {}, a2 = {}, c1 = {}, c2 = {};
    const vf16 kv = vf16{} + k;
    i64 i = 0;
    for (; i + 32 <= len; i += 32) {
      vaccumulate<S, SAME, MASK>(a1, a2, pa, pb, pm, pg, i, kv);
      vaccumulate<S, SAME, MASK>(c1, c2, pa, pb, pm, pg, i + 16, kv);
    }
    if (i + 16 <= len) {
      vaccumulate<S, SAME, MASK>(a1, a2, pa, pb, pm, pg, i, kv);
      i += 16;
    }
    a1 += c1;
    a2 += c2;
    T f1 = 0, f2 = 0;
    for (; i < len; ++i) {
      T t1, t2;
      shifted<S, SAME, MASK>(pa, pb, pm, pg, i, k, t1, t2);
      f1 += t1;
      f2 += t2;
    }
    out1 = f1 + hsum(a1);
    out2 = f2 + hsum(a2);
  } else {  // double: L accumulators in a lane loop
    constexpr int L = 128 / sizeof(T);
    T acc1[L] = {}, acc2[L] = {};
    i64 i = 0;
    for (; i + L <= len; i += L) {
#pragma omp simd
      for (int l = 0; l < L; ++l) {
        T t1, t2;
        shifted<S, SAME, MASK>(pa, pb, pm, pg, i + l, k, t1, t2);
        acc1[l] += t1;
        acc2[l] += t2;
      }
    }
    T f1 = 0, f2 = 0;
    for (; i < len; ++i) {
      T t1, t2;
      shifted<S, SAME, MASK>(pa, pb, pm, pg, i, k, t1, t2);
      f1 += t1;
      f2 += t2;
    }
#pragma omp simd reduction(+ : f1, f2)
    for (int l = 0; l < L; ++l) {
      f1 += acc1[l];
      f2 += acc2[l];
    }
    out1 = f1;
    out2 = f2;
  }
}

// channels_last: a sample is one flat run of hw*c values whose channel is (index % c). Its rows of c values
// are short (16-64 channels in a CIFAR ResNet), so the loops run over "tiles" of tl = tile_len(c) values
// (a whole number of rows, >= 256 values) instead: per-channel coefficients are repeated to tile length
// once, sums are accumulated per tile position and folded into channels at the end.
static inline i64 tile_len(i64 c) { return c >= 256 ? c : c * ((256 + c - 1) / c); }

template <typename T>
static void tile(const T* v, i64 c, i64 tl, T* out) {
  if (out != v) std::memcpy(out, v, c * sizeof(T));  // out == v: the first c values are in place already
  for (i64 t0 = c; t0 < tl; t0 += c) std::memcpy(out + t0, out, c * sizeof(T));
}

// channels_last sums with the per-channel accumulators in vector registers, for float and bfloat16 storage
// and C = 16, 32, 48 or 64 channels (a CIFAR ResNet's widths): a row of C values is V = C/16 vectors of 16
// floats, and R rows go in flight with their own accumulators (R*V = 3 or 4 vectors per sum), so no add waits
// on another's latency. The tiled loop below keeps its accumulators in memory, a load and a store per value
// and sum, which on a CPU with narrow store bandwidth makes the channels_last sums much slower than the same
// sums in NCHW. GCC/Clang vector extensions: 512-bit where the CPU has it,
// split into narrower instructions elsewhere.
template <int V, typename S, bool SAME, bool MASK>
static void sample_sums_regs(const S* a, const S* b, i64 hw, const float* k, double* d1, double* d2, const S* m,
                             S* g) {
  constexpr int C = 16 * V, R = V >= 3 ? 1 : 4 / V;
  constexpr i64 kChunk = 256;  // rows per float accumulation before the sums move to double
  vf16 kv[V];
  for (int v = 0; v < V; ++v) kv[v] = vload(k + 16 * v);
  std::fill(d1, d1 + C, 0.0);
  std::fill(d2, d2 + C, 0.0);
  for (i64 r0 = 0; r0 < hw; r0 += kChunk) {
    const i64 r1 = std::min(hw, r0 + kChunk);
    vf16 acc1[R][V] = {}, acc2[R][V] = {};
    i64 r = r0;
    for (; r + R <= r1; r += R) {
      for (int q = 0; q < R; ++q) {
        for (int v = 0; v < V; ++v) vaccumulate<S, SAME, MASK>(acc1[q][v], acc2[q][v], a, b, m, g, (r + q) * C + 16 * v, kv[v]);
      }
    }
    for (; r < r1; ++r)
      for (int v = 0; v < V; ++v) vaccumulate<S, SAME, MASK>(acc1[0][v], acc2[0][v], a, b, m, g, r * C + 16 * v, kv[v]);
    for (int q = 0; q < R; ++q) {
      for (int v = 0; v < V; ++v) {
        for (int l = 0; l < 16; ++l) {
          d1[16 * v + l] += acc1[q][v][l];
          d2[16 * v + l] += acc2[q][v][l];
        }
      }
    }
  }
}

// Runs the register path when it applies (float / bfloat16 storage, c = 16, 32, 48, 64); false otherwise.
template <typename S, bool SAME, bool MASK>
static inline bool sample_sums_fast(const S* a, const S* b, i64 hw, i64 c, const typename Compute<S>::T* k,
                                    double* d1, double* d2, const S* m, S* g) {
  if constexpr (std::is_same_v<S, double>) {
    return false;
  } else {
    switch (c) {
      case 16: sample_sums_regs<1, S, SAME, MASK>(a, b, hw, k, d1, d2, m, g); return true;
      case 32: sample_sums_regs<2, S, SAME, MASK>(a, b, hw, k, d1, d2, m, g); return true;
      case 48: sample_sums_regs<3, S, SAME, MASK>(a, b, hw, k, d1, d2, m, g); return true;
      case 64: sample_sums_regs<4, S, SAME, MASK>(a, b, hw, k, d1, d2, m, g); return true;
      default: return false;
    }
  }
}

// Per-channel shifted sums (see vaccumulate) of one sample in channels_last, a (hw, c) block, with k the
// channels' shifts tiled to tile_len(c) values: d1[j] = sum (a - k), d2[j] = sum (a - k)^2 (SAME), or
// d1[j] = sum a, d2[j] = sum a*(b - k). q1, q2: scratch of tile_len(c) values (accumulated in T over 32 tiles,
// then added to the double sums).
template <typename S, bool SAME, bool MASK = false, typename T = typename Compute<S>::T>
static void sample_sums_nhwc(const S* a, const S* b, i64 hw, i64 c, const T* k, double* d1, double* d2, T* q1,
                             T* q2, const S* m = nullptr, S* g = nullptr) {
  if (sample_sums_fast<S, SAME, MASK>(a, b, hw, c, k, d1, d2, m, g)) return;
  const i64 tl = tile_len(c), len = hw * c;
  std::fill(d1, d1 + c, 0.0);
  std::fill(d2, d2 + c, 0.0);
  for (i64 start = 0; start < len; start += 32 * tl) {
    const i64 end = std::min(len, start + 32 * tl);
    std::fill(q1, q1 + tl, T(0));
    std::fill(q2, q2 + tl, T(0));
    i64 i = start;
    for (; i + 2 * tl <= end; i += 2 * tl) {  // two tiles per update: half the loads and stores of q
      const S* a0 = a + i;
      const S* b0 = SAME ? a0 : b + i;
      const S* m0 = MASK ? m + i : nullptr;
      S* g0 = MASK ? g + i : nullptr;
#pragma omp simd
      for (i64 t = 0; t < tl; ++t) {
        T x0, y0, x1, y1;
        shifted<S, SAME, MASK>(a0, b0, m0, g0, t, k[t], x0, y0);
        shifted<S, SAME, MASK>(a0, b0, m0, g0, tl + t, k[t], x1, y1);
        q1[t] += x0 + x1;
        q2[t] += y0 + y1;
      }
    }
    for (; i < end; i += tl) {  // the rest: a whole number of rows, at most one tile
      const i64 len0 = std::min(tl, end - i);
      const S* a0 = a + i;
      const S* b0 = SAME ? a0 : b + i;
      const S* m0 = MASK ? m + i : nullptr;
      S* g0 = MASK ? g + i : nullptr;
#pragma omp simd
      for (i64 t = 0; t < len0; ++t) {
        T x0, y0;
        shifted<S, SAME, MASK>(a0, b0, m0, g0, t, k[t], x0, y0);
        q1[t] += x0;
        q2[t] += y0;
      }
    }
    for (i64 t0 = 0; t0 < tl; t0 += c) {
      for (i64 j = 0; j < c; ++j) {
        d1[j] += q1[t0 + j];
        d2[j] += q2[t0 + j];
      }
    }
  }
}

// The affine's output, with the residual r added (RES) and clamped at 0 (RELU).
template <bool RES, bool RELU, typename T>
static inline T post(T v, T r) {
  if (RES) v += r;
  return RELU ? (v < T(0) ? T(0) : v) : v;  // NaN stays NaN, as torch.relu
}

// Calls f(integral_constant RES, integral_constant RELU) for the runtime flags: each (residual, relu)
// variant is its own compiled loop, so the plain affine stays as fast as without the fusion.
template <typename F>
static inline void with_post(bool res, bool relu, F&& f) {
  if (res && relu) f(std::true_type{}, std::true_type{});
  else if (res) f(std::true_type{}, std::false_type{});
  else if (relu) f(std::false_type{}, std::true_type{});
  else f(std::false_type{}, std::false_type{});
}

// y = x * scale + shift (then post) over a flat channels_last run of len values, tile-length coefficients;
// CEN: (x - kc) * scale + shift, centred value by value (kc tile-length too).
template <typename S, bool RES = false, bool RELU = false, bool CEN = false, typename T = typename Compute<S>::T>
static inline void affine_tiled(const S* x, S* y, i64 len, i64 tl, const T* sc, const T* sh,
                                const S* r = nullptr, const T* kc = nullptr) {
  for (i64 i = 0; i < len; i += tl) {
    const i64 m = std::min(tl, len - i);
    const S* px = x + i;
    const S* pr = RES ? r + i : nullptr;
    S* py = y + i;
#pragma omp simd
    for (i64 t = 0; t < m; ++t)
      py[t] = st<S>(post<RES, RELU>((CEN ? ld(px[t]) - kc[t] : ld(px[t])) * sc[t] + sh[t], RES ? ld(pr[t]) : T(0)));
  }
}

// dx = a*dy + b*x + k over a flat channels_last run of len values, with tile-length coefficients; CEN:
// b*(x - kc) instead of b*x (kc tile-length too).
template <typename S, bool CEN = false, typename T = typename Compute<S>::T>
static inline void grad_tiled(const S* dy, const S* x, S* dx, i64 len, i64 tl, const T* a, const T* b,
                              const T* k, const T* kc = nullptr) {
  for (i64 i = 0; i < len; i += tl) {
    const i64 m = std::min(tl, len - i);
    const S* pd = dy + i;
    const S* px = x + i;
    S* po = dx + i;
#pragma omp simd
    for (i64 t = 0; t < m; ++t) po[t] = st<S>(a[t] * ld(pd[t]) + b[t] * (CEN ? ld(px[t]) - kc[t] : ld(px[t])) + k[t]);
  }
}

// channels_last, sample by sample (parallel over samples): K arrays of c coefficients each (with stride 0 the
// same for every sample, tiled once per thread; with stride c, per (sample, channel): sample s's c values at
// coef[q] + s*c) are tiled to tile_len(c) values into t[q*tl ...], followed by X scratch tiles, and f(s, t)
// runs on sample s's flat run of hw*c values.
template <int K, int X, typename T, typename F>
static void per_sample_nhwc(i64 n, i64 hw, i64 c, const T* const (&coef)[K], i64 stride, int nt, F&& f) {
  const i64 tl = tile_len(c);
#pragma omp parallel num_threads(nt) if (nt > 1 && n > 1 && n * hw * c >= kParallelMin)
  {
    std::vector<T> t((K + X) * tl);
    bool tiled = false;
#pragma omp for schedule(static)
    for (i64 s = 0; s < n; ++s) {
      if (stride || !tiled)
        for (int q = 0; q < K; ++q) tile(coef[q] + s * stride, c, tl, t.data() + q * tl);
      tiled = true;
      f(s, t.data());
    }
  }
}

// Per-(sample, channel) shifted sums in channels_last, k the shifts: per channel (kstride 0: BatchNorm) or per
// (sample, channel) (kstride c: Batch-Instance Norm).
template <typename S, bool SAME, bool MASK = false, typename T = typename Compute<S>::T>
static void sums_nhwc(const S* a, const S* b, i64 n, i64 hw, i64 c, const T* k, i64 kstride, double* s1,
                      double* s2, int nt, const S* m = nullptr, S* g = nullptr) {
  const i64 tl = tile_len(c);
  per_sample_nhwc<1, 2>(n, hw, c, {k}, kstride, nt, [&](i64 s, T* t) {
    const i64 off = s * hw * c;
    sample_sums_nhwc<S, SAME, MASK>(a + off, SAME ? nullptr : b + off, hw, c, t, s1 + s * c, s2 + s * c, t + tl,
                                    t + 2 * tl, MASK ? m + off : nullptr, MASK ? g + off : nullptr);
  });
}

// Shifted sums (see vaccumulate; one shift k) of a contiguous run of any length: runs of 4096 in T,
// combined in double.
template <typename S, bool SAME, bool MASK = false, typename T = typename Compute<S>::T>
static void long_sums(const S* a, const S* b, i64 len, T k, double& d1, double& d2, const S* m = nullptr,
                      S* g = nullptr) {
  d1 = d2 = 0;
  for (i64 start = 0; start < len; start += 4096) {
    T f1, f2;
    run_sums<S, SAME, MASK>(a + start, SAME ? a + start : b + start, std::min<i64>(4096, len - start), k, f1, f2,
                            MASK ? m + start : nullptr, MASK ? g + start : nullptr);
    d1 += f1;
    d2 += f2;
  }
}

// Per-row shifted sums in NCHW, row r shifted by k[r].
template <typename S, bool SAME, bool MASK = false, typename T = typename Compute<S>::T>
static void sums_rows(const S* a, const S* b, i64 rows, i64 hw, const T* k, double* s1, double* s2, int nt,
                      const S* m = nullptr, S* g = nullptr) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && rows * hw >= kParallelMin)
  for (i64 r = 0; r < rows; ++r)
    long_sums<S, SAME, MASK>(a + r * hw, SAME ? a + r * hw : b + r * hw, hw, k[r], s1[r], s2[r],
                             MASK ? m + r * hw : nullptr, MASK ? g + r * hw : nullptr);
}

// y = x * scale + shift (then post) per row, per-row coefficients; CEN: (x - kc) * scale + shift.
template <typename S, bool RES = false, bool RELU = false, bool CEN = false, typename T = typename Compute<S>::T>
static void affine_rows(const S* x, S* y, i64 rows, i64 hw, const T* scale, const T* shift, int nt,
                        const S* res = nullptr, const T* kc = nullptr) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && rows * hw >= kParallelMin)
  for (i64 r = 0; r < rows; ++r) {
    const S* px = x + r * hw;
    const S* pr = RES ? res + r * hw : nullptr;
    S* py = y + r * hw;
    const T s = scale[r], t = shift[r], k = CEN ? kc[r] : T(0);
#pragma omp simd
    for (i64 i = 0; i < hw; ++i)
      py[i] = st<S>(post<RES, RELU>((CEN ? ld(px[i]) - k : ld(px[i])) * s + t, RES ? ld(pr[i]) : T(0)));
  }
}

// BatchNorm in channels_last: the whole tensor is one flat run of len values, coefficients per channel;
// parallel over tiles.
template <typename S, bool RES = false, bool RELU = false, typename T = typename Compute<S>::T>
static void affine_nhwc(const S* x, S* y, i64 len, i64 c, const T* scale, const T* shift, int nt,
                        const S* res = nullptr) {
  const i64 tl = tile_len(c);
  std::vector<T> ts(tl), th(tl);
  tile(scale, c, tl, ts.data());
  tile(shift, c, tl, th.data());
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && len >= kParallelMin)
  for (i64 i0 = 0; i0 < len; i0 += tl)
    affine_tiled<S, RES, RELU>(x + i0, y + i0, std::min(tl, len - i0), tl, ts.data(), th.data(),
                               RES ? res + i0 : nullptr);
}

// dx = a*dy + b*x + k per row (CEN: b*(x - kc) instead of b*x), per-row coefficients.
template <typename S, bool CEN = false, typename T = typename Compute<S>::T>
static void grad_rows(const S* dy, const S* x, S* dx, i64 rows, i64 hw, const T* a, const T* b,
                      const T* k, int nt, const T* kc = nullptr) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && rows * hw >= kParallelMin)
  for (i64 r = 0; r < rows; ++r) {
    const S* pd = dy + r * hw;
    const S* px = x + r * hw;
    S* po = dx + r * hw;
    const T va = a[r], vb = b[r], vk = k[r], vc = CEN ? kc[r] : T(0);
#pragma omp simd
    for (i64 i = 0; i < hw; ++i) po[i] = st<S>(va * ld(pd[i]) + vb * (CEN ? ld(px[i]) - vc : ld(px[i])) + vk);
  }
}

// BatchNorm backward in channels_last: as affine_nhwc, dx = a*dy + b*x + k with per-channel a, b, k.
template <typename S, typename T = typename Compute<S>::T>
static void grad_nhwc(const S* dy, const S* x, S* dx, i64 len, i64 c, const T* a, const T* b, const T* k,
                      int nt) {
  const i64 tl = tile_len(c);
  std::vector<T> ta(tl), tb(tl), tk(tl);
  tile(a, c, tl, ta.data());
  tile(b, c, tl, tb.data());
  tile(k, c, tl, tk.data());
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && len >= kParallelMin)
  for (i64 i0 = 0; i0 < len; i0 += tl)
    grad_tiled<S>(dy + i0, x + i0, dx + i0, std::min(tl, len - i0), tl, ta.data(), tb.data(), tk.data());
}

// ------------------------------------------------------------------ the norms, built on those loops
// Layout: 0 = NCHW contiguous, 1 = channels_last. Per-channel / per-group math in double.

// Per-(sample, channel) shifted sums (see vaccumulate) into s1, s2 (n*c each) with shifts k: per channel (c
// values) or, with per_nc, per (sample, channel) (n*c values); m, g (backward of BN + ReLU): a is masked by
// m > 0 and the masked a written to g.
template <typename S, typename T = typename Compute<S>::T>
static void sums_nc(const S* a, const S* b, int nhwc, i64 n, i64 c, i64 hw, const T* k, bool per_nc, double* s1,
                    double* s2, int nt, const S* m = nullptr, S* g = nullptr) {
  if (nhwc) {
    const i64 ks = per_nc ? c : 0;
    if (b == nullptr) sums_nhwc<S, true>(a, a, n, hw, c, k, ks, s1, s2, nt);
    else if (m) sums_nhwc<S, false, true>(a, b, n, hw, c, k, ks, s1, s2, nt, m, g);
    else sums_nhwc<S, false>(a, b, n, hw, c, k, ks, s1, s2, nt);
  } else {
    std::vector<T> kr(per_nc ? 0 : n * c);  // per row (no r % c in the loop: a division per row is a visible cost at 8x8 maps)
    for (i64 s = 0; s < n && !per_nc; ++s) std::memcpy(kr.data() + s * c, k, c * sizeof(T));
    const T* kk = per_nc ? k : kr.data();
    if (b == nullptr) sums_rows<S, true>(a, a, n * c, hw, kk, s1, s2, nt);
    else if (m) sums_rows<S, false, true>(a, b, n * c, hw, kk, s1, s2, nt, m, g);
    else sums_rows<S, false>(a, b, n * c, hw, kk, s1, s2, nt);
  }
}

// BatchNorm, step 1 (forward and backward): per-channel sums over (N, H, W).
// Forward (b null): s1 = sum (a - k), s2 = sum (a - k)^2 with k[j] = center[j] when given (synced BN: one
// shift shared by every rank), else the channel's first value (sample 0, position 0); k is written to ``k``
// (float64, exact) when given: shifted sums, exact for large-mean inputs.
// Backward (b = x): s1 = sum a, s2 = sum a*(b - center) (``center``: the batch mean; null: 0), centred value
// by value. With ``rstd`` and ``gw`` / ``gb`` the weight and bias gradients s2*rstd and s1 are written too.
// With ``m`` (backward of BN + ReLU: the output y) a is masked by m > 0 first and the masked a written to
// ``g``. Synced BN all-reduces s1, s2 between step 1 and 2 (forward: shifted by the shared k).
template <typename S, typename T = typename Compute<S>::T>
static void bn_sums(const S* a, const S* b, int nhwc, i64 n, i64 c, i64 hw, const T* center,
                    const T* rstd, double* s1, double* s2, double* k, T* gw, T* gb, const S* m, S* g, int nt) {
  std::vector<double> p1(n * c), p2(n * c);
  std::vector<T> shift(c, T(0));
  for (i64 j = 0; j < c; ++j) {
    if (center) shift[j] = center[j];
    else if (b == nullptr) shift[j] = ld(a[nhwc ? j : j * hw]);
    if (k) k[j] = double(shift[j]);
  }
  sums_nc<S>(a, b, nhwc, n, c, hw, shift.data(), false, p1.data(), p2.data(), nt, m, g);
  for (i64 j = 0; j < c; ++j) {
    double t1 = 0, t2 = 0;
    for (i64 q = 0; q < n; ++q) {
      t1 += p1[q * c + j];
      t2 += p2[q * c + j];
    }
    s1[j] = t1;
    s2[j] = t2;
    if (gw) gw[j] = T(t2 * double(rstd[j]));
    if (gb) gb[j] = T(t1);
  }
}

// BatchNorm forward, step 2: statistics from the (global) sums of x - k and (x - k)^2 (k null: 0),
// running-statistics update (unbiased variance, as nn.BatchNorm2d), then y = x * scale + shift (+ res when
// given; clamped at 0 with relu).
template <typename S, typename T = typename Compute<S>::T>
static void bn_forward(const S* x, S* y, int nhwc, i64 n, i64 c, i64 hw, const double* s1,
                       const double* s2, const double* k, double total, const T* w, const T* bias, double eps,
                       double momentum, T* run_mean, T* run_var, T* mean_out, T* rstd_out, const S* res,
                       int relu, int nt) {
  std::vector<T> scale(n * c), shift(n * c);
  for (i64 j = 0; j < c; ++j) {
    const double d = s1[j] / total;  // mean - k
    const double var = std::max(s2[j] / total - d * d, 0.0);
    const double mean = (k ? k[j] : 0.0) + d;
    if (run_mean) {
      run_mean[j] = T((1 - momentum) * double(run_mean[j]) + momentum * mean);
      run_var[j] = T((1 - momentum) * double(run_var[j]) + momentum * var * total / (total - 1));
    }
    const T m = T(mean), r = T(1.0 / std::sqrt(var + eps));
    mean_out[j] = m;
    rstd_out[j] = r;
    const T sc = w ? r * w[j] : r;
    const T sh = (bias ? bias[j] : T(0)) - m * sc;
    for (i64 k = 0; k < n; ++k) {
      scale[k * c + j] = sc;
      shift[k * c + j] = sh;
    }
  }
  with_post(res, relu, [&](auto r, auto u) {
    constexpr bool R = decltype(r)::value, U = decltype(u)::value;
    if (nhwc) affine_nhwc<S, R, U>(x, y, n * hw * c, c, scale.data(), shift.data(), nt, res);
    else affine_rows<S, R, U>(x, y, n * c, hw, scale.data(), shift.data(), nt, res);
  });
}

// BatchNorm backward, step 2: dx = a*dy + b*(x - mean) + k from the (global) sums of dy and
// dy*(x - mean): a = rstd*w, b = -a*rstd^2*sum(dy*xc)/total, k = -a*sum(dy)/total.
template <typename S, typename T = typename Compute<S>::T>
static void bn_backward(const S* dy, const S* x, S* dx, int nhwc, i64 n, i64 c, i64 hw,
                        const double* sum_dy, const double* sum_dy_xc, double total, const T* w,
                        const T* mean, const T* rstd, int nt) {
  std::vector<T> va(n * c), vb(n * c), vk(n * c);
  for (i64 j = 0; j < c; ++j) {
    const double r = rstd[j];
    const double a = w ? r * double(w[j]) : r;
    const double b = -a * r * r * sum_dy_xc[j] / total;
    const double k = -a * sum_dy[j] / total - b * double(mean[j]);
    for (i64 s = 0; s < n; ++s) {
      va[s * c + j] = T(a);
      vb[s * c + j] = T(b);
      vk[s * c + j] = T(k);
    }
  }
  if (nhwc) grad_nhwc<S>(dy, x, dx, n * hw * c, c, va.data(), vb.data(), vk.data(), nt);
  else grad_rows<S>(dy, x, dx, n * c, hw, va.data(), vb.data(), vk.data(), nt);
}

// The per-(sample, channel) sweeps shared by Batch-Instance Norm and the spec engine (normlab/norms/sweeps.py;
// BIN's small per-(sample, channel) math: bin_moments ... bin_grad_coefs below). The sums are sums_nc with
// per-(sample, channel) shifts k -- forward, k null: each (sample, channel)'s first value, written to k_out
// (n*c values); backward (b = x), with m (a fused ReLU's output): a is masked by m > 0 and the masked a written
// to g. The output, with per-(sample, channel) coefficients (n*c values each): q null (forward): out = p*P + R,
// or with Pc out = (p - Pc)*P + R, centred value by value, then + res and clamped at 0 with relu; else
// (backward): out = P*p + Q*(q - Qc) + R, centred on Qc. Each flag picks its own compiled loop, outside the
// inner loops: the plain sweeps (BIN's) run the same code as without them.
template <typename S, typename T = typename Compute<S>::T>
static void nc_sums(const S* a, const S* b, int nhwc, i64 n, i64 c, i64 hw, const T* k, T* k_out, double* s1,
                    double* s2, const S* m, S* g, int nt) {
  if (k == nullptr) {
    for (i64 s = 0; s < n; ++s)
      for (i64 j = 0; j < c; ++j) k_out[s * c + j] = ld(a[nhwc ? s * hw * c + j : (s * c + j) * hw]);
    k = k_out;
  }
  sums_nc<S>(a, b, nhwc, n, c, hw, k, true, s1, s2, nt, b ? m : nullptr, b ? g : nullptr);
}

template <typename S, bool RES, bool RELU, bool CEN, typename T = typename Compute<S>::T>
static void nc_affine_t(const S* p, S* out, int nhwc, i64 n, i64 c, i64 hw, const T* P, const T* Pc, const T* R,
                        const S* res, int nt) {
  const i64 len = hw * c, tl = tile_len(c);
  if (!nhwc) {
    affine_rows<S, RES, RELU, CEN>(p, out, n * c, hw, P, R, nt, res, Pc);
  } else if (CEN) {
    per_sample_nhwc<3, 0>(n, hw, c, {P, R, Pc}, c, nt, [&](i64 s, T* t) {
      affine_tiled<S, RES, RELU, true>(p + s * len, out + s * len, len, tl, t, t + tl, RES ? res + s * len : nullptr,
                                       t + 2 * tl);
    });
  } else {
    per_sample_nhwc<2, 0>(n, hw, c, {P, R}, c, nt, [&](i64 s, T* t) {
      affine_tiled<S, RES, RELU>(p + s * len, out + s * len, len, tl, t, t + tl, RES ? res + s * len : nullptr);
    });
  }
}

template <typename S, typename T = typename Compute<S>::T>
static void nc_affine(const S* p, const S* q, S* out, int nhwc, i64 n, i64 c, i64 hw, const T* P, const T* Pc,
                      const T* Q, const T* Qc, const T* R, const S* res, int relu, int nt) {
  const i64 len = hw * c, tl = tile_len(c);
  if (q) {
    if (!nhwc) grad_rows<S, true>(p, q, out, n * c, hw, P, Q, R, nt, Qc);
    else
      per_sample_nhwc<4, 0>(n, hw, c, {P, Q, R, Qc}, c, nt, [&](i64 s, T* t) {
        grad_tiled<S, true>(p + s * len, q + s * len, out + s * len, len, tl, t, t + tl, t + 2 * tl, t + 3 * tl);
      });
    return;
  }
  with_post(res, relu, [&](auto r, auto u) {
    constexpr bool RS = decltype(r)::value, U = decltype(u)::value;
    if (Pc) nc_affine_t<S, RS, U, true>(p, out, nhwc, n, c, hw, P, Pc, R, res, nt);
    else nc_affine_t<S, RS, U, false>(p, out, nhwc, n, c, hw, P, Pc, R, res, nt);
  });
}

// Batch-Instance Norm's small per-(sample, channel) math, in double (_bin.py's module docstring has the
// formulas; the tensor-op path computes the same expressions in the same order with float64 torch ops). n*c
// arrays are (sample, channel) row-major, T is the compute type of the sweeps' coefficients. Each direction is
// two calls so synced BIN can all-reduce BN's per-channel sums between them.

// Forward, step 1: from nc_sums' sums s1, s2 of x - k and (x - k)^2 (k: x[n, c, 0, 0]) over hw values, IN's
// mean (double, and rounded to T: the backward sweep's centre) and rstd per (n, c), and BN's per-channel sums
// of x - kc and (x - kc)^2 with kc = k[0, c] (change of shift d = k - kc: sum s1 + hw*d, sum s2 + d*(2*s1 + hw*d)).
template <typename T>
static void bin_moments(const double* s1, const double* s2, const T* k, i64 n, i64 c, i64 hw, double eps,
                        double* mean_in, double* rstd_in, T* mean_in_t, double* b1, double* b2, double* kc) {
  const double count = double(hw);
  for (i64 j = 0; j < c; ++j) {
    kc[j] = n ? double(k[j]) : 0.0;
    b1[j] = 0;
    b2[j] = 0;
  }
  for (i64 s = 0; s < n; ++s) {
    for (i64 j = 0; j < c; ++j) {
      const i64 i = s * c + j;
      const double m = s1[i] / count;  // mean - k
      const double var = std::max(s2[i] / count - m * m, 0.0);  // NaN stays NaN, as clamp_min
      mean_in[i] = m + double(k[i]);
      rstd_in[i] = 1.0 / std::sqrt(var + eps);
      mean_in_t[i] = T(mean_in[i]);
      const double d = double(k[i]) - kc[j];
      b1[j] += s1[i] + count * d;
      b2[j] += s2[i] + d * (2 * s1[i] + count * d);
    }
  }
}

static inline double clamp01(double r) { return r < 0 ? 0.0 : (r > 1 ? 1.0 : r); }  // NaN stays NaN

// Forward, step 2: BN's mean and biased variance from its per-channel sums p1, p2 of x - kc and (x - kc)^2
// (kc null: plain sums) over *total_p (when given: synced, the all-reduced count) or total values -- or, with
// ``moments``, p1 and p2 are the mean and variance themselves (eval: the running statistics); the running
// statistics' update when run_mean is given (double buffers, in place: (1 - momentum)*r + momentum*stat, the
// variance unbiased); rstd; and the per-(n, c) affine y = x*scale + shift of ρ·x̂_BN + (1 − ρ)·x̂_IN, ρ clamped
// to [0, 1]: scale = ργ·rstd_BN + (1 − ρ)γ·rstd_IN, shift = β − ργ·rstd_BN·mean_BN − (1 − ρ)γ·rstd_IN·mean_IN.
template <typename T>
static void bin_scale(const double* p1, const double* p2, const double* kc, int moments, const double* total_p,
                      double total, i64 n, i64 c, double eps, double momentum, double* run_mean, double* run_var,
                      const double* mean_in, const double* rstd_in, const T* w, const T* bias, const T* rho,
                      double* mean_bn, double* var_bn, double* rstd_bn, T* scale, T* shift) {
  if (total_p) total = *total_p;
  for (i64 j = 0; j < c; ++j) {
    double mean = p1[j], var = p2[j];
    if (!moments) {
      mean = p1[j] / total;
      var = std::max(p2[j] / total - mean * mean, 0.0);
      if (kc) mean = mean + kc[j];
    }
    if (run_mean) {
      run_mean[j] = run_mean[j] * (1 - momentum) + momentum * mean;
      run_var[j] = run_var[j] * (1 - momentum) + momentum * (var * (total / (total - 1)));
    }
    const double rb = 1.0 / std::sqrt(var + eps);
    mean_bn[j] = mean;
    var_bn[j] = var;
    rstd_bn[j] = rb;
    const double r = clamp01(double(rho[j])), g = double(w[j]);
    const double wb = r * g, wi = (1 - r) * g;
    for (i64 s = 0; s < n; ++s) {
      const i64 i = s * c + j;
      scale[i] = T(wb * rb + wi * rstd_in[i]);
      shift[i] = T(double(bias[j]) - wb * rb * mean - wi * rstd_in[i] * mean_in[i]);
    }
  }
}

// Backward, step 1: from nc_sums' sums g1 = sum g and g2 = sum g*(x - mean_in) per (n, c) (mean_in: the
// forward's, rounded to T), BN's per-channel sums h1 = sum g, h2 = sum g*(x - mean_bn) (local: synced BIN
// all-reduces them before step 2) and the weight, bias and ρ gradients (local), in double (grads, 3*c) and
// rounded to T (grads_t): dγ = ρ·rstd_BN·h2 + (1 − ρ)·Σ rstd_IN·g2, dβ = h1, dρ = γ·(rstd_BN·h2 − Σ rstd_IN·g2)
// (the clamped gate's gradient, passed through unclamped).
template <typename T>
static void bin_grad_sums(const double* g1, const double* g2, const T* mean_in, const double* rstd_in,
                          const double* mean_bn, const double* rstd_bn, const T* w, const T* rho, i64 n, i64 c,
                          double* h1, double* h2, double* grads, T* grads_t) {
  for (i64 j = 0; j < c; ++j) {
    double t1 = 0, t2 = 0, in2 = 0;
    for (i64 s = 0; s < n; ++s) {
      const i64 i = s * c + j;
      t1 += g1[i];
      t2 += g2[i] + (double(mean_in[i]) - mean_bn[j]) * g1[i];
      in2 += rstd_in[i] * g2[i];
    }
    h1[j] = t1;
    h2[j] = t2;
    const double r = clamp01(double(rho[j])), g = double(w[j]);
    const double gw = r * rstd_bn[j] * t2 + (1 - r) * in2, gr = g * (rstd_bn[j] * t2 - in2);
    grads[j] = gw;
    grads[c + j] = t1;
    grads[2 * c + j] = gr;
    grads_t[j] = T(gw);
    grads_t[c + j] = T(t1);
    grads_t[2 * c + j] = T(gr);
  }
}

// Backward, step 2: dx = a*g + b*(x - mean_in) + cst per (n, c), a = ργ·rstd_BN + (1 − ρ)γ·rstd_IN,
// b = −(1 − ρ)γ·rstd_IN³·g2/hw, cst = −(1 − ρ)γ·rstd_IN·g1/hw; with h1, h2 (training: BN's statistics depend on
// x; the synced sums and *total_p / total values per channel) the BN terms bb = −ργ·rstd_BN³·h2/total join b,
// and −ργ·rstd_BN·h1/total + bb·(mean_in − mean_BN) join cst.
template <typename T>
static void bin_grad_coefs(const double* g1, const double* g2, const T* mean_in, const double* rstd_in,
                           const double* mean_bn, const double* rstd_bn, const T* w, const T* rho,
                           const double* h1, const double* h2, const double* total_p, double total, i64 n, i64 c,
                           i64 hw, T* a, T* b, T* cst) {
  if (total_p) total = *total_p;
  const double count = double(hw);
  for (i64 j = 0; j < c; ++j) {
    const double r = clamp01(double(rho[j])), g = double(w[j]);
    const double wb = r * g, wi = (1 - r) * g, rb = rstd_bn[j];
    const double bb = h1 ? -wb * (rb * rb * rb) * h2[j] / total : 0.0;
    for (i64 s = 0; s < n; ++s) {
      const i64 i = s * c + j;
      const double ri = rstd_in[i], mi = double(mean_in[i]);
      double vb = -wi * (ri * ri * ri) * g2[i] / count;
      double vc = -wi * ri * g1[i] / count;
      if (h1) {
        vb = vb + bb;
        vc = vc - wb * rb * h1[j] / total + bb * (mi - mean_bn[j]);
      }
      a[i] = T(wb * rb + wi * ri);
      b[i] = T(vb);
      cst[i] = T(vc);
    }
  }
}

// GroupNorm (G = C: InstanceNorm, G = 1: LayerNorm): statistics per (sample, group). Blocked for the
// cache, like PyTorch's own kernel: in NCHW a (sample, group) is one contiguous block of C/G*H*W values,
// in channels_last a sample is one (H*W, C) block; each block's statistics and its affine (forward), or
// its sums and dx (backward), are done back to back while the block is still in cache.

// Statistics of group q from per-channel sums d1, d2 (of one sample) of x - k and (x - k)^2, k the group's shift.
static inline void group_stats(const double* d1, const double* d2, i64 q, i64 cg, double k, double count,
                               double eps, double& mean, double& rstd) {
  double t1 = 0, t2 = 0;
  for (i64 j = q * cg; j < (q + 1) * cg; ++j) {
    t1 += d1[j];
    t2 += d2[j];
  }
  const double d = t1 / count;  // mean - k
  mean = k + d;
  rstd = 1.0 / std::sqrt(std::max(t2 / count - d * d, 0.0) + eps);
}

// dx = a*dy + b*x + k for group q, from the sample's per-channel sums of dy (p1) and dy*(x - mean) (p2):
// a = rstd*w, b = -rstd^2*m2, k = rstd*(rstd*m2*mean - m1), m1 = mean of w*dy, m2 = mean of w*dy*x_hat.
template <typename T>
static inline void group_grad_coefs(const double* p1, const double* p2, const T* w, i64 q, i64 cg,
                                    double count, double mean, double rstd, double& b, double& k) {
  double g1 = 0, g2 = 0;
  for (i64 j = q * cg; j < (q + 1) * cg; ++j) {
    const double wj = w ? double(w[j]) : 1.0;
    g1 += wj * p1[j];
    g2 += wj * p2[j];
  }
  const double m1 = g1 / count;
  const double m2 = rstd * g2 / count;
  b = -rstd * rstd * m2;
  k = rstd * (rstd * m2 * mean - m1);
}

// GroupNorm forward; RES / RELU: + res, clamped at 0 (as BatchNorm's fused forward).
template <typename S, bool RES, bool RELU, typename T = typename Compute<S>::T>
static void gn_forward_t(const S* x, S* y, int nhwc, i64 n, i64 c, i64 hw, i64 g, const T* w,
                         const T* bias, double eps, T* mean_out, T* rstd_out, const S* res, int nt) {
  const i64 cg = c / g;
  const double count = double(cg * hw);
  if (!nhwc) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && n * c * hw >= kParallelMin)
    for (i64 blk = 0; blk < n * g; ++blk) {
      const i64 q = blk % g;
      const S* px = x + blk * cg * hw;
      S* py = y + blk * cg * hw;
      double t1, t2;
      const T k = ld(px[0]);  // the shift: the block's first value
      long_sums<S, true>(px, px, cg * hw, k, t1, t2);
      const double d = t1 / count;  // mean - k
      const double mean = double(k) + d;
      const double rstd = 1.0 / std::sqrt(std::max(t2 / count - d * d, 0.0) + eps);
      const T m = T(mean), r = T(rstd);
      mean_out[blk] = m;
      rstd_out[blk] = r;
      for (i64 j = 0; j < cg; ++j) {
        const i64 ch = q * cg + j;
        const T sc = w ? r * w[ch] : r;
        const T sh = (bias ? bias[ch] : T(0)) - m * sc;
        const S* xr = px + j * hw;
        const S* rr = RES ? res + blk * cg * hw + j * hw : nullptr;
        S* yr = py + j * hw;
#pragma omp simd
        for (i64 i = 0; i < hw; ++i) yr[i] = st<S>(post<RES, RELU>(ld(xr[i]) * sc + sh, RES ? ld(rr[i]) : T(0)));
      }
    }
    return;
  }
#pragma omp parallel num_threads(nt) if (nt > 1 && n > 1 && n * c * hw >= kParallelMin)
  {
    const i64 tl = tile_len(c);
    std::vector<T> q1(tl), q2(tl), scale(tl), shift(tl), kt(tl);
    std::vector<double> d1(c), d2(c);
#pragma omp for schedule(static)
    for (i64 s = 0; s < n; ++s) {
      const S* px = x + s * hw * c;
      S* py = y + s * hw * c;
      // the shifts: each group's first value (its first channel at position 0), per channel, tiled
      for (i64 q = 0; q < g; ++q) std::fill(kt.data() + q * cg, kt.data() + (q + 1) * cg, ld(px[q * cg]));
      const bool whole = g == 1;  // LayerNorm: one sum over the whole sample (into d1[0], d2[0])
      if (whole) {
        long_sums<S, true>(px, px, hw * c, kt[0], d1[0], d2[0]);
      } else {
        tile(kt.data(), c, tl, kt.data());
        sample_sums_nhwc<S, true>(px, nullptr, hw, c, kt.data(), d1.data(), d2.data(), q1.data(), q2.data());
      }
      for (i64 q = 0; q < g; ++q) {
        double mean, rstd;
        group_stats(d1.data(), d2.data(), q, whole ? 1 : cg, double(kt[q * cg]), count, eps, mean, rstd);
        const T m = T(mean), r = T(rstd);
        mean_out[s * g + q] = m;
        rstd_out[s * g + q] = r;
        for (i64 j = q * cg; j < (q + 1) * cg; ++j) {
          scale[j] = w ? r * w[j] : r;
          shift[j] = (bias ? bias[j] : T(0)) - m * scale[j];
        }
      }
      tile(scale.data(), c, tl, scale.data());  // in place: copies the first c values along
      tile(shift.data(), c, tl, shift.data());
      affine_tiled<S, RES, RELU>(px, py, hw * c, tl, scale.data(), shift.data(), RES ? res + s * hw * c : nullptr);
    }
  }
}

template <typename S, typename T = typename Compute<S>::T>
static void gn_forward(const S* x, S* y, int nhwc, i64 n, i64 c, i64 hw, i64 g, const T* w,
                       const T* bias, double eps, T* mean_out, T* rstd_out, const S* res, int relu, int nt) {
  with_post(res, relu, [&](auto r, auto u) {
    gn_forward_t<S, decltype(r)::value, decltype(u)::value>(x, y, nhwc, n, c, hw, g, w, bias, eps, mean_out,
                                                            rstd_out, res, nt);
  });
}

// GroupNorm backward: weight/bias gradients (when gw/gb are given) and dx (when dx is given). MASK (the
// fused ReLU's backward): dy is masked by m > 0 in the sums pass, written to g, and dx computed from g.
template <typename S, bool MASK, typename T = typename Compute<S>::T>
static void gn_backward_t(const S* dy, const S* x, S* dx, int nhwc, i64 n, i64 c, i64 hw, i64 g,
                          const T* w, const T* mean, const T* rstd, T* gw, T* gb, const S* m, S* gout, int nt) {
  const i64 cg = c / g;
  const double count = double(cg * hw);
  std::vector<double> p1(n * c), p2(n * c);  // sum dy, sum dy*(x - mean) per (n, c): centred value by value
  if (!nhwc) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && n * c * hw >= kParallelMin)
    for (i64 blk = 0; blk < n * g; ++blk) {
      const i64 s = blk / g, q = blk % g;
      const i64 off = blk * cg * hw;
      for (i64 j = 0; j < cg; ++j) {
        const i64 row = s * c + q * cg + j;
        const i64 o = off + j * hw;
        long_sums<S, false, MASK>(dy + o, x + o, hw, mean[blk], p1[row], p2[row], MASK ? m + o : nullptr,
                                  MASK ? gout + o : nullptr);
      }
      if (!dx) continue;
      const double m = mean[blk], r = rstd[blk];
      double b, k;
      group_grad_coefs<T>(p1.data() + s * c, p2.data() + s * c, w, q, cg, count, m, r, b, k);
      const T vb = T(b), vk = T(k);
      for (i64 j = 0; j < cg; ++j) {
        const i64 ch = q * cg + j;
        const T va = T(w ? r * double(w[ch]) : r);
        const S* pd = (MASK ? gout : dy) + off + j * hw;
        const S* px = x + off + j * hw;
        S* po = dx + off + j * hw;
#pragma omp simd
        for (i64 i = 0; i < hw; ++i) po[i] = st<S>(va * ld(pd[i]) + vb * ld(px[i]) + vk);
      }
    }
  } else {
#pragma omp parallel num_threads(nt) if (nt > 1 && n > 1 && n * c * hw >= kParallelMin)
    {
      const i64 tl = tile_len(c);
      std::vector<T> q1(tl), q2(tl), va(tl), vb(tl), vk(tl), kt(tl);
#pragma omp for schedule(static)
      for (i64 s = 0; s < n; ++s) {
        const i64 off = s * hw * c;
        double* d1 = p1.data() + s * c;
        double* d2 = p2.data() + s * c;
        for (i64 q = 0; q < g; ++q)  // centre on the group's mean
          std::fill(kt.data() + q * cg, kt.data() + (q + 1) * cg, mean[s * g + q]);
        tile(kt.data(), c, tl, kt.data());
        sample_sums_nhwc<S, false, MASK>(dy + off, x + off, hw, c, kt.data(), d1, d2, q1.data(), q2.data(),
                                         MASK ? m + off : nullptr, MASK ? gout + off : nullptr);
        if (!dx) continue;
        for (i64 q = 0; q < g; ++q) {
          const double m = mean[s * g + q], r = rstd[s * g + q];
          double b, k;
          group_grad_coefs<T>(d1, d2, w, q, cg, count, m, r, b, k);
          for (i64 j = q * cg; j < (q + 1) * cg; ++j) {
            va[j] = T(w ? r * double(w[j]) : r);
            vb[j] = T(b);
            vk[j] = T(k);
          }
        }
        tile(va.data(), c, tl, va.data());
        tile(vb.data(), c, tl, vb.data());
        tile(vk.data(), c, tl, vk.data());
        grad_tiled<S>((MASK ? gout : dy) + off, x + off, dx + off, hw * c, tl, va.data(), vb.data(), vk.data());
      }
    }
  }
  if (gw || gb) {
    for (i64 j = 0; j < c; ++j) {
      double t1 = 0, t2 = 0;
      for (i64 s = 0; s < n; ++s) {
        const i64 q = s * g + j / cg;
        t1 += p1[s * c + j];
        t2 += p2[s * c + j] * double(rstd[q]);
      }
      if (gw) gw[j] = T(t2);
      if (gb) gb[j] = T(t1);
    }
  }
}

template <typename S, typename T = typename Compute<S>::T>
static void gn_backward(const S* dy, const S* x, S* dx, int nhwc, i64 n, i64 c, i64 hw, i64 g,
                        const T* w, const T* mean, const T* rstd, T* gw, T* gb, const S* m, S* gout, int nt) {
  if (m) gn_backward_t<S, true>(dy, x, dx, nhwc, n, c, hw, g, w, mean, rstd, gw, gb, m, gout, nt);
  else gn_backward_t<S, false>(dy, x, dx, nhwc, n, c, hw, g, w, mean, rstd, gw, gb, m, gout, nt);
}

// C entry points: suffix f = float32, d = float64, b = bfloat16 storage (computed in float32). S is the
// big tensors' type, T the statistics', parameters' and gradients' type (float for bfloat16). Null
// pointers mean "absent" (no affine, no running statistics, gradient not needed).
#define NORMLAB_EXPORT(S, T, X)                                                                       \
  extern "C" void normlab_bn_sums_##X(const S* a, const S* b, int nhwc, i64 n, i64 c, i64 hw,         \
                                      const T* center, const T* rstd, double* s1, double* s2,         \
                                      double* k, T* gw, T* gb, const S* m, S* g, int nt) {           \
    bn_sums<S>(a, b, nhwc, n, c, hw, center, rstd, s1, s2, k, gw, gb, m, g, nt);                     \
  }                                                                                                  \
  extern "C" void normlab_bn_forward_##X(const S* x, S* y, int nhwc, i64 n, i64 c, i64 hw,            \
                                         const double* s1, const double* s2, const double* k,        \
                                         double total,                                               \
                                         const T* w, const T* b, double eps, double momentum,        \
                                         T* run_mean, T* run_var, T* mean_out, T* rstd_out,          \
                                         const S* res, int relu, int nt) {                           \
    bn_forward<S>(x, y, nhwc, n, c, hw, s1, s2, k, total, w, b, eps, momentum, run_mean, run_var,    \
                  mean_out, rstd_out, res, relu, nt);                                                \
  }                                                                                                  \
  extern "C" void normlab_bn_backward_##X(const S* dy, const S* x, S* dx, int nhwc, i64 n, i64 c,    \
                                          i64 hw, const double* sum_dy, const double* sum_dy_xc,     \
                                          double total, const T* w, const T* mean, const T* rstd,    \
                                          int nt) {                                                  \
    bn_backward<S>(dy, x, dx, nhwc, n, c, hw, sum_dy, sum_dy_xc, total, w, mean, rstd, nt);          \
  }                                                                                                  \
  extern "C" void normlab_nc_sums_##X(const S* a, const S* b, int nhwc, i64 n, i64 c, i64 hw, const T* k, \
                                      T* k_out, double* s1, double* s2, const S* m, S* g, int nt) {  \
    nc_sums<S>(a, b, nhwc, n, c, hw, k, k_out, s1, s2, m, g, nt);                                    \
  }                                                                                                  \
  extern "C" void normlab_nc_affine_##X(const S* p, const S* q, S* out, int nhwc, i64 n, i64 c,       \
                                        i64 hw, const T* P, const T* Pc, const T* Q, const T* Qc,    \
                                        const T* R, const S* res, int relu, int nt) {                \
    nc_affine<S>(p, q, out, nhwc, n, c, hw, P, Pc, Q, Qc, R, res, relu, nt);                         \
  }                                                                                                  \
  extern "C" void normlab_gn_forward_##X(const S* x, S* y, int nhwc, i64 n, i64 c, i64 hw, i64 g,    \
                                         const T* w, const T* b, double eps, T* mean_out,            \
                                         T* rstd_out, const S* res, int relu, int nt) {              \
    gn_forward<S>(x, y, nhwc, n, c, hw, g, w, b, eps, mean_out, rstd_out, res, relu, nt);            \
  }                                                                                                  \
  extern "C" void normlab_gn_backward_##X(const S* dy, const S* x, S* dx, int nhwc, i64 n, i64 c,    \
                                          i64 hw, i64 g, const T* w, const T* mean, const T* rstd,   \
                                          T* gw, T* gb, const S* m, S* gout, int nt) {               \
    gn_backward<S>(dy, x, dx, nhwc, n, c, hw, g, w, mean, rstd, gw, gb, m, gout, nt);                \
  }                                                                                                  \
  extern "C" void normlab_bin_moments_##X(const double* s1, const double* s2, const T* k, i64 n, i64 c,  \
                                          i64 hw, double eps, double* mean_in, double* rstd_in,      \
                                          T* mean_in_t, double* b1, double* b2, double* kc) {        \
    bin_moments<T>(s1, s2, k, n, c, hw, eps, mean_in, rstd_in, mean_in_t, b1, b2, kc);               \
  }                                                                                                  \
  extern "C" void normlab_bin_scale_##X(const double* p1, const double* p2, const double* kc,         \
                                        int moments, const double* total_p, double total, i64 n,     \
                                        i64 c, double eps, double momentum, double* run_mean,        \
                                        double* run_var, const double* mean_in,                      \
                                        const double* rstd_in, const T* w, const T* bias,            \
                                        const T* rho, double* mean_bn, double* var_bn,               \
                                        double* rstd_bn, T* scale, T* shift) {                       \
    bin_scale<T>(p1, p2, kc, moments, total_p, total, n, c, eps, momentum, run_mean, run_var,        \
                 mean_in, rstd_in, w, bias, rho, mean_bn, var_bn, rstd_bn, scale, shift);            \
  }                                                                                                  \
  extern "C" void normlab_bin_grad_sums_##X(const double* g1, const double* g2, const T* mean_in,     \
                                            const double* rstd_in, const double* mean_bn,            \
                                            const double* rstd_bn, const T* w, const T* rho, i64 n,  \
                                            i64 c, double* h1, double* h2, double* grads,            \
                                            T* grads_t) {                                            \
    bin_grad_sums<T>(g1, g2, mean_in, rstd_in, mean_bn, rstd_bn, w, rho, n, c, h1, h2, grads,        \
                     grads_t);                                                                       \
  }                                                                                                  \
  extern "C" void normlab_bin_grad_coefs_##X(const double* g1, const double* g2, const T* mean_in,    \
                                             const double* rstd_in, const double* mean_bn,           \
                                             const double* rstd_bn, const T* w, const T* rho,        \
                                             const double* h1, const double* h2,                     \
                                             const double* total_p, double total, i64 n, i64 c,      \
                                             i64 hw, T* a, T* b, T* cst) {                           \
    bin_grad_coefs<T>(g1, g2, mean_in, rstd_in, mean_bn, rstd_bn, w, rho, h1, h2, total_p, total, n, \
                      c, hw, a, b, cst);                                                             \
  }

NORMLAB_EXPORT(float, float, f)
NORMLAB_EXPORT(double, double, d)
NORMLAB_EXPORT(bf16, float, b)
