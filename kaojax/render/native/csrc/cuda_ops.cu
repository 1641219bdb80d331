// CUDA backend of the native rasterizers: the same XLA FFI targets as
// cpu_ops.cc, with the math of raster_math.h. One thread block per (view,
// tile), one thread per pixel. Kernels allocate nothing and never synchronise
// with the host: scratch is an XLA output, zeroing is cudaMemsetAsync on
// XLA's stream, so the handlers can be captured into CUDA graphs.
#include <cuda_runtime.h>

#include <cstdint>

#include "raster_math.h"
#include "tiling.h"
#include "xla/ffi/api/ffi.h"

namespace kaojax {
namespace {

constexpr int kSelectThreads = 256;

__device__ uint32_t orderable(float key) {
  const uint32_t bits = __float_as_uint(key);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Number of primitives covering the tile that satisfy pred(i), summed over the block.
template <typename Pred>
__device__ int32_t block_count(const int32_t* rects, int64_t n, int tx, int ty, Pred pred,
                               int32_t* shared) {
  __syncthreads();
  if (threadIdx.x == 0) *shared = 0;
  __syncthreads();
  int32_t local = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
    if (covers(rects + 4 * i, tx, ty) && pred((int32_t)i)) ++local;
  if (local) atomicAdd(shared, local);
  __syncthreads();
  return *shared;
}

// Tile lists: the `capacity` nearest covering primitives by (key, index),
// nearest first, padded with -1; counts = all covering primitives. When more
// than `capacity` cover a tile, the cut (key, index) is found by bisection on
// the key's bits, then on the index.
__global__ void select_tiles(const float* keys_all, const int32_t* rects_all, int64_t n,
                             int tiles_x, int tiles, int32_t capacity, int32_t* ids_all,
                             int32_t* counts) {
  __shared__ int32_t shared_count;
  __shared__ int32_t shared_pos;
  const int64_t vt = blockIdx.x;
  const int64_t v = vt / tiles;
  const int t = (int)(vt % tiles);
  const int tx = t % tiles_x, ty = t / tiles_x;
  const float* keys = keys_all + v * n;
  const int32_t* rects = rects_all + v * n * 4;
  int32_t* ids = ids_all + vt * capacity;

  const int32_t count = block_count(rects, n, tx, ty, [](int32_t) { return true; },
                                    &shared_count);
  uint32_t cut_key = 0xFFFFFFFFu;
  int32_t cut_id = 0x7FFFFFFF;
  if (count > capacity) {
    uint32_t lo = 0, hi = 0xFFFFFFFFu;  // smallest u with #(key <= u) >= capacity
    while (lo < hi) {
      const uint32_t mid = lo + (hi - lo) / 2;
      const int32_t c = block_count(rects, n, tx, ty,
                                    [&](int32_t i) { return orderable(keys[i]) <= mid; },
                                    &shared_count);
      if (c >= capacity) hi = mid; else lo = mid + 1;
    }
    cut_key = lo;
    const int32_t below = block_count(
        rects, n, tx, ty, [&](int32_t i) { return orderable(keys[i]) < cut_key; },
        &shared_count);
    const int32_t need = capacity - below;  // taken among the keys equal to the cut
    int32_t ilo = 0, ihi = (int32_t)(n - 1);
    while (ilo < ihi) {
      const int32_t mid = ilo + (ihi - ilo) / 2;
      const int32_t c = block_count(
          rects, n, tx, ty,
          [&](int32_t i) { return orderable(keys[i]) == cut_key && i <= mid; }, &shared_count);
      if (c >= need) ihi = mid; else ilo = mid + 1;
    }
    cut_id = ilo;
  }
  __syncthreads();
  if (threadIdx.x == 0) shared_pos = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    if (!covers(rects + 4 * i, tx, ty)) continue;
    const uint32_t k = orderable(keys[i]);
    if (k < cut_key || (k == cut_key && i <= cut_id)) ids[atomicAdd(&shared_pos, 1)] = (int32_t)i;
  }
  __syncthreads();
  const int32_t kept = min(count, capacity);
  // odd-even transposition sort of ids[0:kept] by (key, index)
  for (int32_t phase = 0; phase < kept; ++phase) {
    for (int32_t j = 2 * threadIdx.x + (phase & 1); j + 1 < kept; j += 2 * blockDim.x) {
      const int32_t a = ids[j], b = ids[j + 1];
      if (nearer(keys, b, a)) {
        ids[j] = b;
        ids[j + 1] = a;
      }
    }
    __syncthreads();
  }
  for (int32_t j = kept + threadIdx.x; j < capacity; j += blockDim.x) ids[j] = -1;
  if (threadIdx.x == 0) counts[vt] = count;
}

struct PixelIndex {
  bool inside;
  int x, y;
  int64_t view, tile, pixel;
};

__device__ PixelIndex pixel_of_thread(const Grid& g) {
  const int64_t vt = blockIdx.x;
  const int tiles = g.num_tiles();
  const int t = (int)(vt % tiles);
  PixelIndex p;
  p.view = vt / tiles;
  p.tile = vt;
  p.x = (t % g.tiles_x) * g.tile_size + (int)threadIdx.x % g.tile_size;
  p.y = (t / g.tiles_x) * g.tile_size + (int)threadIdx.x / g.tile_size;
  p.inside = p.x < g.width && p.y < g.height;
  p.pixel = p.view * g.pixels() + (int64_t)p.y * g.width + p.x;
  return p;
}

template <typename Kind>
__global__ void composite_forward(Grid g, const float* prims, int64_t n, const int32_t* ids,
                                  const int32_t* counts, int32_t capacity, float* feats,
                                  float* trans, int32_t* last) {
  const PixelIndex p = pixel_of_thread(g);
  if (!p.inside) return;
  const int kept = min(counts[p.tile], capacity);
  composite_pixel<Kind>(prims + p.view * n * Kind::P, ids + p.tile * capacity, kept,
                        p.x + 0.5f, p.y + 0.5f, feats + p.pixel * Kind::F, trans + p.pixel,
                        last + p.pixel);
}

template <int P>
struct SlotAdd {
  float* slot;
  KJ_HD void operator()(int j, const float* dp) const {
#if defined(__CUDA_ARCH__)
    for (int c = 0; c < P; ++c)
      if (dp[c] != 0.0f) atomicAdd(slot + j * P + c, dp[c]);
#endif
  }
};

template <typename Kind>
__global__ void composite_backward(Grid g, const float* prims, int64_t n, const int32_t* ids,
                                   int32_t capacity, const int32_t* last, const float* trans,
                                   const float* grad_feats, const float* grad_trans,
                                   float* slots) {
  const PixelIndex p = pixel_of_thread(g);
  if (!p.inside) return;
  composite_pixel_vjp<Kind>(prims + p.view * n * Kind::P, ids + p.tile * capacity,
                            last[p.pixel], p.x + 0.5f, p.y + 0.5f, trans[p.pixel],
                            grad_feats + p.pixel * Kind::F, grad_trans[p.pixel],
                            SlotAdd<Kind::P>{slots + p.tile * capacity * Kind::P});
}

// grad[view, ids[slot]] += slots[slot] for every filled slot.
template <int P>
__global__ void gather_slots(const int32_t* ids, const int32_t* counts, int64_t num_slots,
                             int32_t capacity, int tiles, int64_t n, const float* slots,
                             float* grad) {
  const int64_t s = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (s >= num_slots) return;
  const int64_t vt = s / capacity;
  if (s % capacity >= counts[vt] || ids[s] < 0) return;
  float* out = grad + ((vt / tiles) * n + ids[s]) * P;
  for (int c = 0; c < P; ++c)
    if (slots[s * P + c] != 0.0f) atomicAdd(out + c, slots[s * P + c]);
}

__global__ void mesh_visibility(Grid g, const float* tris, int64_t n, const int32_t* ids,
                                const int32_t* counts, int32_t capacity, int32_t* face_id) {
  const PixelIndex p = pixel_of_thread(g);
  if (!p.inside) return;
  face_id[p.pixel] = visible_face(tris + p.view * n * 9, ids + p.tile * capacity,
                                  min(counts[p.tile], capacity), p.x + 0.5f, p.y + 0.5f);
}

ffi::Error launched(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("kaojax native rasterizer: ") + what + ": " +
                                cudaGetErrorString(err));
  return ffi::Error::Success();
}

// call_shape, plus the CUDA limit: one thread per pixel of a tile.
template <typename Prims, typename Ids>
ffi::Error cuda_call_shape(const Grid& g, const Prims& prims, int64_t params, const Ids& ids,
                           CallShape* shape) {
  if (g.tile_size * g.tile_size > 1024) return invalid("tile_size must be at most 32 on CUDA");
  return call_shape(g, prims, params, ids, shape);
}

template <typename Kind>
ffi::Error CompositeForward(cudaStream_t stream, ffi::Buffer<ffi::F32> prims,
                            ffi::Buffer<ffi::F32> keys, ffi::Buffer<ffi::S32> rects,
                            ffi::ResultBuffer<ffi::F32> feats, ffi::ResultBuffer<ffi::F32> trans,
                            ffi::ResultBuffer<ffi::S32> ids, ffi::ResultBuffer<ffi::S32> counts,
                            ffi::ResultBuffer<ffi::S32> last, int32_t width, int32_t height,
                            int32_t tile_size) {
  const Grid g = make_grid(width, height, tile_size);
  CallShape shape;
  if (auto e = cuda_call_shape(g, prims, Kind::P, *ids, &shape); e.failure()) return e;
  const int64_t n = shape.n, views = shape.views;
  const int32_t capacity = shape.capacity;
  const int64_t blocks = views * g.num_tiles();
  if (blocks == 0) return ffi::Error::Success();
  select_tiles<<<blocks, kSelectThreads, 0, stream>>>(keys.typed_data(), rects.typed_data(), n,
                                                      g.tiles_x, g.num_tiles(), capacity,
                                                      ids->typed_data(), counts->typed_data());
  composite_forward<Kind><<<blocks, tile_size * tile_size, 0, stream>>>(
      g, prims.typed_data(), n, ids->typed_data(), counts->typed_data(), capacity,
      feats->typed_data(), trans->typed_data(), last->typed_data());
  return launched("forward");
}

template <typename Kind>
ffi::Error CompositeBackward(cudaStream_t stream, ffi::Buffer<ffi::F32> prims,
                             ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::S32> counts,
                             ffi::Buffer<ffi::S32> last, ffi::Buffer<ffi::F32> trans,
                             ffi::Buffer<ffi::F32> grad_feats, ffi::Buffer<ffi::F32> grad_trans,
                             ffi::ResultBuffer<ffi::F32> grad_prims,
                             ffi::ResultBuffer<ffi::F32> slot_grads, int32_t width,
                             int32_t height, int32_t tile_size) {
  const Grid g = make_grid(width, height, tile_size);
  CallShape shape;
  if (auto e = cuda_call_shape(g, prims, Kind::P, ids, &shape); e.failure()) return e;
  const int64_t n = shape.n, views = shape.views;
  const int32_t capacity = shape.capacity;
  cudaMemsetAsync(grad_prims->typed_data(), 0, grad_prims->size_bytes(), stream);
  cudaMemsetAsync(slot_grads->typed_data(), 0, slot_grads->size_bytes(), stream);
  const int64_t blocks = views * g.num_tiles();
  if (blocks == 0) return launched("backward");
  composite_backward<Kind><<<blocks, tile_size * tile_size, 0, stream>>>(
      g, prims.typed_data(), n, ids.typed_data(), capacity, last.typed_data(),
      trans.typed_data(), grad_feats.typed_data(), grad_trans.typed_data(),
      slot_grads->typed_data());
  const int64_t num_slots = blocks * capacity;
  gather_slots<Kind::P><<<(num_slots + 255) / 256, 256, 0, stream>>>(
      ids.typed_data(), counts.typed_data(), num_slots, capacity, g.num_tiles(), n,
      slot_grads->typed_data(), grad_prims->typed_data());
  return launched("backward");
}

ffi::Error MeshVisibility(cudaStream_t stream, ffi::Buffer<ffi::F32> tris,
                          ffi::Buffer<ffi::F32> keys, ffi::Buffer<ffi::S32> rects,
                          ffi::ResultBuffer<ffi::S32> face_id, ffi::ResultBuffer<ffi::S32> ids,
                          ffi::ResultBuffer<ffi::S32> counts, int32_t width, int32_t height,
                          int32_t tile_size) {
  const Grid g = make_grid(width, height, tile_size);
  CallShape shape;
  if (auto e = cuda_call_shape(g, tris, 9, *ids, &shape); e.failure()) return e;
  const int64_t n = shape.n, views = shape.views;
  const int32_t capacity = shape.capacity;
  const int64_t blocks = views * g.num_tiles();
  if (blocks == 0) return ffi::Error::Success();
  select_tiles<<<blocks, kSelectThreads, 0, stream>>>(keys.typed_data(), rects.typed_data(), n,
                                                      g.tiles_x, g.num_tiles(), capacity,
                                                      ids->typed_data(), counts->typed_data());
  mesh_visibility<<<blocks, tile_size * tile_size, 0, stream>>>(
      g, tris.typed_data(), n, ids->typed_data(), counts->typed_data(), capacity,
      face_id->typed_data());
  return launched("mesh visibility");
}

}  // namespace
}  // namespace kaojax

namespace ffi = xla::ffi;

// No allocation, no host synchronisation: safe to capture into CUDA graphs.
#define KAOJAX_GRAPH_SAFE {ffi::Traits::kCmdBufferCompatible}
#define KAOJAX_STREAM ffi::PlatformStream<cudaStream_t>

XLA_FFI_DEFINE_HANDLER_SYMBOL(kaojax_surfel_forward_cuda,
                              kaojax::CompositeForward<kaojax::SurfelKind>,
                              KAOJAX_FORWARD_BINDING(KAOJAX_STREAM), KAOJAX_GRAPH_SAFE);
XLA_FFI_DEFINE_HANDLER_SYMBOL(kaojax_surfel_backward_cuda,
                              kaojax::CompositeBackward<kaojax::SurfelKind>,
                              KAOJAX_BACKWARD_BINDING(KAOJAX_STREAM), KAOJAX_GRAPH_SAFE);
XLA_FFI_DEFINE_HANDLER_SYMBOL(kaojax_gaussian_forward_cuda,
                              kaojax::CompositeForward<kaojax::GaussianKind>,
                              KAOJAX_FORWARD_BINDING(KAOJAX_STREAM), KAOJAX_GRAPH_SAFE);
XLA_FFI_DEFINE_HANDLER_SYMBOL(kaojax_gaussian_backward_cuda,
                              kaojax::CompositeBackward<kaojax::GaussianKind>,
                              KAOJAX_BACKWARD_BINDING(KAOJAX_STREAM), KAOJAX_GRAPH_SAFE);
XLA_FFI_DEFINE_HANDLER_SYMBOL(kaojax_mesh_visibility_cuda, kaojax::MeshVisibility,
                              KAOJAX_MESH_BINDING(KAOJAX_STREAM), KAOJAX_GRAPH_SAFE);
