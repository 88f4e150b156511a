// Trilinear and nearest-neighbour warping of [X, Y, Z, C] volumes on XLA:CPU,
// registered with jax.ffi by jaxreg/warp_ffi.py.
//
// Every kernel samples a channels-last volume `vol` [X, Y, Z, C] at N points
// pts [N, 3]: voxel coordinates in array axis order, or (attribute grid = 1)
// displacements in voxels on an output grid gx x gy x gz, the pull-back
// warp's points. The border rules are those of jaxreg.warp:
//   padding 0 "constant": a corner outside the volume contributes cval;
//   padding 1 "border":   corner indices are clamped (the edge extends).
// The formulas are those of jaxreg/warp.py (interior points as nested linear
// interpolations), so both paths agree to float32 rounding.
//
// Kernels:
//   jaxreg_trilinear       out[N, C]
//   jaxreg_trilinear_grad  out[N, C] and d out / d (x, y, z)  [N, C, 3]
//   jaxreg_trilinear_vjp   the points' gradient [N, 3] from a cotangent ct[N, C]
//   jaxreg_splat           the adjoint in the volume: dvol[X, Y, Z, C] from ct[N, C]
//   jaxreg_nearest         out[N, C] for 1, 2, 4 or 8 byte elements
// Work is split over XLA's intra-op thread pool (ffi::ThreadPool), at most
// `threads` workers (0: the pool's size). The splat gives each chunk of points
// its own accumulator covering only the X slabs its corners reach, then sums
// the accumulators slab by slab in parallel: no atomics, no serial loop.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ---------------------------------------------------------------- threads

struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
};

// Runs body(chunk) for chunk in [0, nchunks) on up to `workers` threads (the
// caller included). Tasks grab chunks from a counter, so the caller finishes
// the work itself when the pool is busy or has one thread, and a task that
// starts after the work is done touches nothing but the shared counters.
template <typename Body>
void ParallelChunks(ffi::ThreadPool& pool, int64_t workers, int64_t nchunks, Body&& body) {
  if (nchunks <= 0) return;
  auto shared = std::make_shared<Shared>();
  auto run = [shared, nchunks, &body]() {
    for (;;) {
      int64_t c = shared->next.fetch_add(1);
      if (c >= nchunks) return;
      body(c);
      if (shared->done.fetch_add(1) + 1 == nchunks) {
        std::lock_guard<std::mutex> lock(shared->mu);
        shared->cv.notify_all();
      }
    }
  };
  int64_t helpers = std::min<int64_t>(workers, nchunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) {
    auto task = run;
    pool.Schedule(std::move(task));
  }
  run();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == nchunks; });
}

int64_t Workers(ffi::ThreadPool& pool, int64_t threads) {
  int64_t n = pool.num_threads();
  if (n < 1) n = 1;
  return threads > 0 ? std::min(threads, n) : n;
}

// ---------------------------------------------------------------- one axis

struct Geometry {
  int64_t nx, ny, nz, nc, n;
};

constexpr int64_t kPointsPerChunk = 16384;

int64_t Chunks(int64_t n) { return (n + kPointsPerChunk - 1) / kPointsPerChunk; }

// One coordinate along an axis of n voxels. As in
// jaxreg.warp._coordinate_derivatives, the coordinate is clipped to [-1, n]
// (constant: beyond it every corner is outside) or [0, n - 1] (border: beyond
// it the edge extends); the corners are floor(c) and floor(c) + 1, clamped
// into the volume, `in` telling which lie inside it; the derivative along
// this axis is zero where the unclipped coordinate leaves the clip range.
// The value of jaxreg.warp._trilinear_value (unclipped coordinates, zeroed
// weights of outside corners) is the same function of these terms.
struct Axis {
  int64_t i0, i1;
  bool in0, in1;
  float t;
  bool live;
};

inline Axis AxisOf(float c, int64_t n, bool constant) {
  const float lo = constant ? -1.0f : 0.0f;
  const float hi = static_cast<float>(constant ? n : n - 1);
  Axis a;
  a.live = c >= lo && c <= hi;
  const float cc = std::min(std::max(c, lo), hi);
  int64_t i = static_cast<int64_t>(cc);
  if (static_cast<float>(i) > cc) --i;  // floor
  a.t = cc - static_cast<float>(i);
  a.in0 = i >= 0 && i < n;
  a.in1 = i + 1 >= 0 && i + 1 < n;
  a.i0 = std::min(std::max(i, int64_t{0}), n - 1);
  a.i1 = std::min(std::max(i + 1, int64_t{0}), n - 1);
  return a;
}

// ---------------------------------------------------------------- one point

// A sample point: the offsets (in floats, channel 0) of its 8 corners, which
// of them lie inside the volume, its fractions and which derivatives live.
// Corner k = 4a + 2b + e is (x_a, y_b, z_e).
struct Point {
  int64_t off[8];
  bool in[8];
  float tx, ty, tz;
  bool live[3];
};

// False for a NaN coordinate. Used for points near or beyond the border.
inline bool MakePoint(const Geometry& g, float x, float y, float z, bool constant, Point* p) {
  if (std::isnan(x) || std::isnan(y) || std::isnan(z)) return false;
  const int64_t sz = g.nc, sy = g.nz * g.nc, sx = g.ny * g.nz * g.nc;
  const Axis ax = AxisOf(x, g.nx, constant), ay = AxisOf(y, g.ny, constant),
             az = AxisOf(z, g.nz, constant);
  const int64_t xi[2] = {ax.i0 * sx, ax.i1 * sx}, yi[2] = {ay.i0 * sy, ay.i1 * sy},
                zi[2] = {az.i0 * sz, az.i1 * sz};
  const bool xin[2] = {ax.in0, ax.in1}, yin[2] = {ay.in0, ay.in1}, zin[2] = {az.in0, az.in1};
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < 2; ++b)
      for (int e = 0; e < 2; ++e) {
        p->off[4 * a + 2 * b + e] = xi[a] + yi[b] + zi[e];
        p->in[4 * a + 2 * b + e] = !constant || (xin[a] && yin[b] && zin[e]);
      }
  p->tx = ax.t;
  p->ty = ay.t;
  p->tz = az.t;
  p->live[0] = ax.live;
  p->live[1] = ay.live;
  p->live[2] = az.live;
  return true;
}

// Value (and with kDerivs the derivatives along x, y, z) of channel c.
// The sums run in the order of jaxreg/warp.py. A corner outside the volume
// reads cval; one with zero weight adds nothing (so cval = NaN marks only
// samples that reach outside).
template <bool kDerivs>
inline void Sample(const Point& p, const float* vol, int64_t c, float cval, float* value,
                   float* dx, float* dy, float* dz) {
  float v[8];
  for (int k = 0; k < 8; ++k) v[k] = p.in[k] ? vol[p.off[k] + c] : cval;
  const float wx[2] = {1.0f - p.tx, p.tx}, wy[2] = {1.0f - p.ty, p.ty},
              wz[2] = {1.0f - p.tz, p.tz};
  float o = 0.0f;
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < 2; ++b) {
      const float wxy = wx[a] * wy[b];
      for (int e = 0; e < 2; ++e) {
        const int k = 4 * a + 2 * b + e;
        const float w = wxy * wz[e];
        if (p.in[k] || w != 0.0f) o += w * v[k];
      }
    }
  *value = o;
  if (!kDerivs) return;
  float d = 0.0f;
  for (int b = 0; b < 2; ++b)
    for (int e = 0; e < 2; ++e) d += wy[b] * wz[e] * (v[4 + 2 * b + e] - v[2 * b + e]);
  *dx = p.live[0] ? d : 0.0f;
  d = 0.0f;
  for (int a = 0; a < 2; ++a)
    for (int e = 0; e < 2; ++e) d += wx[a] * wz[e] * (v[4 * a + 2 + e] - v[4 * a + e]);
  *dy = p.live[1] ? d : 0.0f;
  d = 0.0f;
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < 2; ++b) d += wx[a] * wy[b] * (v[4 * a + 2 * b + 1] - v[4 * a + 2 * b]);
  *dz = p.live[2] ? d : 0.0f;
}

// ---------------------------------------------------------------- points

// The N sample points come as pts [N, 3]: voxel coordinates (grid == 0), or
// displacements on an output grid of gx x gy x gz = N voxels (grid == 1), the
// point of output voxel (i, j, k) being (i, j, k) + pts[n] (a pull-back warp:
// no coordinate arrays are built).
struct Points {
  const float* pts;
  bool grid;
  int64_t gy, gz;
};

// Calls f(n, x, y, z) for n in [begin, end).
template <typename F>
inline void ForPoints(const Points& P, int64_t begin, int64_t end, F&& f) {
  if (!P.grid) {
    for (int64_t n = begin; n < end; ++n)
      f(n, P.pts[3 * n], P.pts[3 * n + 1], P.pts[3 * n + 2]);
    return;
  }
  int64_t i = begin / (P.gy * P.gz), j = (begin / P.gz) % P.gy, k = begin % P.gz;
  for (int64_t n = begin; n < end; ++n) {
    f(n, static_cast<float>(i) + P.pts[3 * n], static_cast<float>(j) + P.pts[3 * n + 1],
      static_cast<float>(k) + P.pts[3 * n + 2]);
    if (++k == P.gz) {
      k = 0;
      if (++j == P.gy) {
        j = 0;
        ++i;
      }
    }
  }
}

// ---------------------------------------------------------------- trilinear

// The common case, a point whose 8 corners all lie inside the volume: nested
// linear interpolations (z, then y, then x) on the corner values at `b`, and
// the derivatives from the same intermediates. Equal to the general path to
// float32 rounding.
template <bool kDerivs>
inline void InteriorSample(const float* b, int64_t sx, int64_t sy, int64_t sz, float tx,
                           float ty, float tz, float* value, float* dx, float* dy, float* dz) {
  const float v000 = b[0], v001 = b[sz], v010 = b[sy], v011 = b[sy + sz];
  const float v100 = b[sx], v101 = b[sx + sz], v110 = b[sx + sy], v111 = b[sx + sy + sz];
  const float d00 = v001 - v000, d01 = v011 - v010, d10 = v101 - v100, d11 = v111 - v110;
  const float c00 = v000 + tz * d00, c01 = v010 + tz * d01;
  const float c10 = v100 + tz * d10, c11 = v110 + tz * d11;
  const float c0 = c00 + ty * (c01 - c00), c1 = c10 + ty * (c11 - c10);
  *value = c0 + tx * (c1 - c0);
  if (kDerivs) {
    *dx = c1 - c0;
    const float e0 = c01 - c00, e1 = c11 - c10;
    *dy = e0 + tx * (e1 - e0);
    const float f0 = d00 + ty * (d01 - d00), f1 = d10 + ty * (d11 - d10);
    *dz = f0 + tx * (f1 - f0);
  }
}

// One point: values o[C] and, with kDerivs, derivatives d[C, 3] (d/dx, d/dy, d/dz).
template <bool kDerivs>
inline void SamplePoint(const Geometry& g, const float* vol, bool constant, float cval, float x,
                        float y, float z, float* o, float* d) {
  const int64_t C = g.nc, sz = C, sy = g.nz * C, sx = g.ny * g.nz * C;
  if (x >= 0.0f && x < static_cast<float>(g.nx - 1) && y >= 0.0f &&
      y < static_cast<float>(g.ny - 1) && z >= 0.0f && z < static_cast<float>(g.nz - 1)) {
    const int64_t ix = static_cast<int64_t>(x), iy = static_cast<int64_t>(y),
                  iz = static_cast<int64_t>(z);
    const float tx = x - static_cast<float>(ix), ty = y - static_cast<float>(iy),
                tz = z - static_cast<float>(iz);
    const float* b = vol + ix * sx + iy * sy + iz * sz;
    for (int64_t c = 0; c < C; ++c) {
      if (kDerivs) {
        InteriorSample<true>(b + c, sx, sy, sz, tx, ty, tz, o + c, d + 3 * c, d + 3 * c + 1,
                             d + 3 * c + 2);
      } else {
        InteriorSample<false>(b + c, sx, sy, sz, tx, ty, tz, o + c, nullptr, nullptr, nullptr);
      }
    }
    return;
  }
  Point p;
  if (!MakePoint(g, x, y, z, constant, &p)) {
    for (int64_t c = 0; c < C; ++c) {
      o[c] = NAN;
      if (kDerivs) d[3 * c] = d[3 * c + 1] = d[3 * c + 2] = NAN;
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    if (kDerivs) {
      Sample<true>(p, vol, c, cval, o + c, d + 3 * c, d + 3 * c + 1, d + 3 * c + 2);
    } else {
      Sample<false>(p, vol, c, cval, o + c, nullptr, nullptr, nullptr);
    }
  }
}

// Values out[N, C] and, with kDerivs, derivatives deriv[N, C, 3].
template <bool kDerivs>
void SampleRange(const Geometry& g, const float* vol, const Points& P, bool constant, float cval,
                 float* out, float* deriv, int64_t begin, int64_t end) {
  const int64_t C = g.nc;
  ForPoints(P, begin, end, [&](int64_t i, float x, float y, float z) {
    SamplePoint<kDerivs>(g, vol, constant, cval, x, y, z, out + i * C,
                         kDerivs ? deriv + 3 * i * C : nullptr);
  });
}

// The points' gradient grad[N, 3] = sum over c of ct[n, c] * d out[n, c] / d (x, y, z).
void VjpRange(const Geometry& g, const float* vol, const Points& P, bool constant, float cval,
              const float* ct, float* grad, int64_t begin, int64_t end) {
  const int64_t C = g.nc;
  float value[16], d[48];
  std::vector<float> big_value, big_d;
  float *vp = value, *dp = d;
  if (C > 16) {
    big_value.resize(C);
    big_d.resize(3 * C);
    vp = big_value.data();
    dp = big_d.data();
  }
  ForPoints(P, begin, end, [&](int64_t i, float x, float y, float z) {
    SamplePoint<true>(g, vol, constant, cval, x, y, z, vp, dp);
    float gx = 0.0f, gy = 0.0f, gz = 0.0f;
    for (int64_t c = 0; c < C; ++c) {
      const float t = ct[i * C + c];
      gx += t * dp[3 * c];
      gy += t * dp[3 * c + 1];
      gz += t * dp[3 * c + 2];
    }
    grad[3 * i] = gx;
    grad[3 * i + 1] = gy;
    grad[3 * i + 2] = gz;
  });
}

Points PointsOf(ffi::Buffer<ffi::F32>& pts, int32_t grid, int64_t gy, int64_t gz) {
  return Points{pts.typed_data(), grid != 0, gy, gz};
}

ffi::Error CheckShapes(ffi::Buffer<ffi::F32>& pts, int32_t grid, int64_t gx, int64_t gy,
                       int64_t gz, size_t vol_rank) {
  if (vol_rank != 4) return ffi::Error::InvalidArgument("the volume must be [X, Y, Z, C]");
  auto d = pts.dimensions();
  if (d.size() != 2 || d[1] != 3) return ffi::Error::InvalidArgument("pts must be [N, 3]");
  if (grid != 0 && gx * gy * gz != d[0])
    return ffi::Error::InvalidArgument("the output grid does not hold N points");
  return ffi::Error::Success();
}

// Checks the shapes, then runs range(g, P, constant, fill, begin, end) over
// chunks of the points on the pool: the body of the three trilinear kernels.
template <typename Range>
ffi::Error OverPoints(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& vol,
                      ffi::Buffer<ffi::F32>& pts, int32_t padding, float cval, int32_t grid,
                      int64_t gx, int64_t gy, int64_t gz, int64_t threads, Range&& range) {
  ffi::Error bad = CheckShapes(pts, grid, gx, gy, gz, vol.dimensions().size());
  if (bad.failure()) return bad;
  auto d = vol.dimensions();
  const Geometry g{d[0], d[1], d[2], d[3], pts.dimensions()[0]};
  const Points P = PointsOf(pts, grid, gy, gz);
  const bool constant = padding == 0;
  const float fill = constant ? cval : 0.0f;
  ParallelChunks(pool, Workers(pool, threads), Chunks(g.n), [&](int64_t c) {
    const int64_t b = c * kPointsPerChunk, e = std::min(g.n, b + kPointsPerChunk);
    range(g, P, constant, fill, b, e);
  });
  return ffi::Error::Success();
}

ffi::Error TrilinearImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> vol,
                         ffi::Buffer<ffi::F32> pts, ffi::ResultBuffer<ffi::F32> out,
                         int32_t padding, float cval, int32_t grid, int64_t gx, int64_t gy,
                         int64_t gz, int64_t threads) {
  const float* v = vol.typed_data();
  float* o = out->typed_data();
  return OverPoints(pool, vol, pts, padding, cval, grid, gx, gy, gz, threads,
                    [&](const Geometry& g, const Points& P, bool constant, float fill,
                        int64_t b, int64_t e) {
                      SampleRange<false>(g, v, P, constant, fill, o, nullptr, b, e);
                    });
}

ffi::Error TrilinearGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> vol,
                             ffi::Buffer<ffi::F32> pts, ffi::ResultBuffer<ffi::F32> out,
                             ffi::ResultBuffer<ffi::F32> deriv, int32_t padding, float cval,
                             int32_t grid, int64_t gx, int64_t gy, int64_t gz, int64_t threads) {
  const float* v = vol.typed_data();
  float *o = out->typed_data(), *dv = deriv->typed_data();
  return OverPoints(pool, vol, pts, padding, cval, grid, gx, gy, gz, threads,
                    [&](const Geometry& g, const Points& P, bool constant, float fill,
                        int64_t b, int64_t e) {
                      SampleRange<true>(g, v, P, constant, fill, o, dv, b, e);
                    });
}

ffi::Error TrilinearVjpImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> vol,
                            ffi::Buffer<ffi::F32> pts, ffi::Buffer<ffi::F32> ct,
                            ffi::ResultBuffer<ffi::F32> grad, int32_t padding, float cval,
                            int32_t grid, int64_t gx, int64_t gy, int64_t gz, int64_t threads) {
  const float *v = vol.typed_data(), *t = ct.typed_data();
  float* o = grad->typed_data();
  return OverPoints(pool, vol, pts, padding, cval, grid, gx, gy, gz, threads,
                    [&](const Geometry& g, const Points& P, bool constant, float fill,
                        int64_t b, int64_t e) { VjpRange(g, v, P, constant, fill, t, o, b, e); });
}

// ---------------------------------------------------------------- splat

// The adjoint of the value in the volume: every point adds weight * ct to the
// corners inside the volume. Points are cut into one contiguous chunk per
// worker; a chunk accumulates into its own buffer over the X slabs [lo, hi]
// its corners reach, then the buffers are summed slab by slab in parallel.
ffi::Error SplatImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> ct, ffi::Buffer<ffi::F32> pts,
                     ffi::ResultBuffer<ffi::F32> dvol, int32_t padding, int32_t grid, int64_t gx,
                     int64_t gy, int64_t gz, int64_t threads) {
  auto dims = dvol->dimensions();
  ffi::Error bad = CheckShapes(pts, grid, gx, gy, gz, dims.size());
  if (bad.failure()) return bad;
  const Geometry g{dims[0], dims[1], dims[2], dims[3], pts.dimensions()[0]};
  const Points P = PointsOf(pts, grid, gy, gz);
  const bool constant = padding == 0;
  const float* cts = ct.typed_data();
  float* out = dvol->typed_data();
  const int64_t C = g.nc, slab = g.ny * g.nz * C;
  const int64_t workers = Workers(pool, threads);
  const int64_t nchunks = std::max<int64_t>(1, std::min(workers, Chunks(g.n)));
  const int64_t per = (g.n + nchunks - 1) / nchunks;
  std::vector<int64_t> lo(nchunks, 0), hi(nchunks, -1);
  std::vector<std::vector<float>> acc(nchunks);
  ParallelChunks(pool, workers, nchunks, [&](int64_t k) {
    const int64_t b = k * per, e = std::min(g.n, b + per);
    int64_t xmin = g.nx - 1, xmax = 0;
    ForPoints(P, b, e, [&](int64_t, float x, float, float) {
      if (std::isnan(x)) return;
      const Axis ax = AxisOf(x, g.nx, constant);
      xmin = std::min(xmin, ax.i0);
      xmax = std::max(xmax, ax.i1);
    });
    if (xmin > xmax) return;
    lo[k] = xmin;
    hi[k] = xmax;
    acc[k].assign(static_cast<size_t>((xmax - xmin + 1) * slab), 0.0f);
    float* base = acc[k].data() - xmin * slab;
    const int64_t sz = C, sy = g.nz * C, sx = g.ny * g.nz * C;
    const float hx = static_cast<float>(g.nx - 1), hy = static_cast<float>(g.ny - 1),
                hz = static_cast<float>(g.nz - 1);
    ForPoints(P, b, e, [&](int64_t i, float x, float y, float z) {
      const float* t = cts + i * C;
      if (x >= 0.0f && x < hx && y >= 0.0f && y < hy && z >= 0.0f && z < hz) {
        const int64_t ix = static_cast<int64_t>(x), iy = static_cast<int64_t>(y),
                      iz = static_cast<int64_t>(z);
        const float tx = x - static_cast<float>(ix), ty = y - static_cast<float>(iy),
                    tz = z - static_cast<float>(iz);
        float* d = base + ix * sx + iy * sy + iz * sz;
        const float w00 = (1.0f - tx) * (1.0f - ty), w01 = (1.0f - tx) * ty;
        const float w10 = tx * (1.0f - ty), w11 = tx * ty;
        for (int64_t c = 0; c < C; ++c) {
          const float a1 = t[c] * tz, a0 = t[c] - a1;
          d[c] += w00 * a0;
          d[c + sz] += w00 * a1;
          d[c + sy] += w01 * a0;
          d[c + sy + sz] += w01 * a1;
          d[c + sx] += w10 * a0;
          d[c + sx + sz] += w10 * a1;
          d[c + sx + sy] += w11 * a0;
          d[c + sx + sy + sz] += w11 * a1;
        }
        return;
      }
      Point p;
      if (!MakePoint(g, x, y, z, constant, &p)) return;
      const float wx[2] = {1.0f - p.tx, p.tx}, wy[2] = {1.0f - p.ty, p.ty},
                  wz[2] = {1.0f - p.tz, p.tz};
      float w[8];
      for (int a = 0; a < 2; ++a)
        for (int bb = 0; bb < 2; ++bb)
          for (int ee = 0; ee < 2; ++ee) {
            const int q = 4 * a + 2 * bb + ee;
            w[q] = p.in[q] ? wx[a] * wy[bb] * wz[ee] : 0.0f;
          }
      for (int64_t c = 0; c < C; ++c) {
        const float tc = t[c];
        for (int q = 0; q < 8; ++q) base[p.off[q] + c] += w[q] * tc;
      }
    });
  });
  ParallelChunks(pool, workers, g.nx, [&](int64_t xslab) {
    float* o = out + xslab * slab;
    std::memset(o, 0, sizeof(float) * slab);
    for (int64_t k = 0; k < nchunks; ++k) {
      if (xslab < lo[k] || xslab > hi[k]) continue;
      const float* src = acc[k].data() + (xslab - lo[k]) * slab;
      for (int64_t i = 0; i < slab; ++i) o[i] += src[i];
    }
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- nearest

template <typename T>
void NearestTyped(ffi::ThreadPool& pool, int64_t workers, const Geometry& g, const T* vol,
                  const Points& P, bool constant, T cval, T* out) {
  const int64_t C = g.nc;
  const int64_t n3[3] = {g.nx, g.ny, g.nz};
  ParallelChunks(pool, workers, Chunks(g.n), [&](int64_t chunk) {
    const int64_t b = chunk * kPointsPerChunk, e = std::min(g.n, b + kPointsPerChunk);
    ForPoints(P, b, e, [&](int64_t p, float x, float y, float z) {
      // floor(c + 0.5): round half up, as jaxreg.warp._nearest (and scipy).
      const float c3[3] = {x, y, z};
      int64_t idx[3];
      bool inside = true;
      for (int k = 0; k < 3; ++k) {
        float c = std::min(std::max(c3[k] + 0.5f, -1.0f), static_cast<float>(n3[k] + 1));
        if (std::isnan(c3[k])) c = 0.0f;
        int64_t i = static_cast<int64_t>(std::floor(c));
        inside = inside && i >= 0 && i < n3[k];
        idx[k] = std::min(std::max(i, int64_t{0}), n3[k] - 1);
      }
      T* o = out + p * C;
      if (constant && !inside) {
        for (int64_t c = 0; c < C; ++c) o[c] = cval;
      } else {
        const T* v = vol + ((idx[0] * g.ny + idx[1]) * g.nz + idx[2]) * C;
        for (int64_t c = 0; c < C; ++c) o[c] = v[c];
      }
    });
  });
}

ffi::Error NearestImpl(ffi::ThreadPool pool, ffi::AnyBuffer vol, ffi::Buffer<ffi::F32> pts,
                       ffi::Result<ffi::AnyBuffer> out, int32_t padding, double cval,
                       int32_t grid, int64_t gx, int64_t gy, int64_t gz, int64_t threads) {
  auto d = vol.dimensions();
  ffi::Error bad = CheckShapes(pts, grid, gx, gy, gz, d.size());
  if (bad.failure()) return bad;
  if (vol.element_type() != out->element_type())
    return ffi::Error::InvalidArgument("vol and out dtypes differ");
  const Geometry g{d[0], d[1], d[2], d[3], pts.dimensions()[0]};
  const Points P = PointsOf(pts, grid, gy, gz);
  const int64_t w = Workers(pool, threads);
  const bool constant = padding == 0;
  void* o = out->untyped_data();
  const void* v = vol.untyped_data();
#define JAXREG_NEAREST(DT, T)                                                        \
  case ffi::DataType::DT:                                                          \
    NearestTyped<T>(pool, w, g, static_cast<const T*>(v), P, constant,             \
                    static_cast<T>(cval), static_cast<T*>(o));                     \
    return ffi::Error::Success();
  switch (vol.element_type()) {
    JAXREG_NEAREST(PRED, bool)
    JAXREG_NEAREST(S8, int8_t)
    JAXREG_NEAREST(U8, uint8_t)
    JAXREG_NEAREST(S16, int16_t)
    JAXREG_NEAREST(U16, uint16_t)
    JAXREG_NEAREST(S32, int32_t)
    JAXREG_NEAREST(U32, uint32_t)
    JAXREG_NEAREST(S64, int64_t)
    JAXREG_NEAREST(U64, uint64_t)
    JAXREG_NEAREST(F32, float)
    JAXREG_NEAREST(F64, double)
    default:
      return ffi::Error::InvalidArgument("jaxreg_nearest: unsupported dtype");
  }
#undef JAXREG_NEAREST
}

}  // namespace

#define JAXREG_POINT_ATTRS          \
  Attr<int32_t>("grid")             \
      .Attr<int64_t>("gx")          \
      .Attr<int64_t>("gy")          \
      .Attr<int64_t>("gz")          \
      .Attr<int64_t>("threads")

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxregTrilinear, TrilinearImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("padding")
                                  .Attr<float>("cval")
                                  .JAXREG_POINT_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxregTrilinearGrad, TrilinearGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("padding")
                                  .Attr<float>("cval")
                                  .JAXREG_POINT_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxregTrilinearVjp, TrilinearVjpImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("padding")
                                  .Attr<float>("cval")
                                  .JAXREG_POINT_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxregSplat, SplatImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("padding")
                                  .JAXREG_POINT_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxregNearest, NearestImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("padding")
                                  .Attr<double>("cval")
                                  .JAXREG_POINT_ATTRS);
