// CUDA backend of the native rasterizers: the same XLA FFI targets as
// cpu_ops.cc, with the math of raster_math.h. One thread block per (view,
// tile), one thread per pixel.
//
// Binning is sort-based (gsplat's scheme), without a per-tile cap: every
// primitive writes one 64-bit key per tile of its rectangle, (view * tiles +
// tile) above the depth's order-preserving bits, at its primitive-major offset
// (an inclusive scan of the rectangle sizes); one stable radix sort of the keys
// gives every tile its contiguous range, front to back with ties by index. The
// number of intersections is read back to the host once per call to size the
// lists, which live in XLA's scratch memory; the handlers therefore synchronise
// with the host and are not captured into CUDA graphs. The backward pass rebuilds
// the same lists, accumulates one gradient per intersection (atomics among the
// pixels of a tile: the order of those float additions is not fixed) and sums
// each primitive's intersections in a fixed order.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>
#include <string>

#include "raster_math.h"
#include "tiling.h"
#include "xla/ffi/api/ffi.h"

namespace kaojax {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

__device__ uint32_t orderable(float key) {
  const uint32_t bits = __float_as_uint(key);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// A primitive's tile rectangle, clamped to the grid.
struct Rect {
  int x0, y0, x1, y1;
  __device__ int64_t tiles() const { return (int64_t)max(x1 - x0, 0) * max(y1 - y0, 0); }
};

__device__ Rect rect_of(const Grid& g, const int32_t* r) {
  return Rect{max(r[0], 0), max(r[1], 0), min(r[2], g.tiles_x), min(r[3], g.tiles_y)};
}

// sizes[i] = tiles in the rectangle of primitive i (all views' primitives).
__global__ void rect_sizes(Grid g, const int32_t* rects, int64_t count, int64_t* sizes) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i < count) sizes[i] = rect_of(g, rects + 4 * i).tiles();
}

// One (key, value) per intersection at its primitive-major position k: key =
// (view * tiles + tile) << 32 | depth bits, value = k; owner[k] = the primitive
// (index within its view).
__global__ void expand(Grid g, const float* keys, const int32_t* rects, const int64_t* ends,
                       int64_t count, int64_t n, uint64_t* sort_keys, int64_t* values,
                       int32_t* owner) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= count) return;
  const Rect r = rect_of(g, rects + 4 * i);
  const uint64_t view = (uint64_t)(i / n);
  const uint64_t depth = orderable(keys[i]);
  int64_t k = ends[i] - r.tiles();
  for (int ty = r.y0; ty < r.y1; ++ty)
    for (int tx = r.x0; tx < r.x1; ++tx, ++k) {
      const uint64_t tile = view * (uint64_t)g.num_tiles() + (uint64_t)(ty * g.tiles_x + tx);
      sort_keys[k] = (tile << 32) | depth;
      values[k] = k;
      owner[k] = (int32_t)(i % n);
    }
}

// ranges[2 vt], ranges[2 vt + 1]: [start, end) of (view, tile) vt in the sorted
// list (zeroed beforehand: empty tiles stay [0, 0)).
__global__ void tile_ranges(const uint64_t* sorted_keys, int64_t total, int64_t* ranges) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t vt = (int64_t)(sorted_keys[i] >> 32);
  if (i == 0 || (int64_t)(sorted_keys[i - 1] >> 32) != vt) ranges[2 * vt] = i;
  if (i == total - 1 || (int64_t)(sorted_keys[i + 1] >> 32) != vt) ranges[2 * vt + 1] = i + 1;
}

// ids[j] = owner[flat[j]]: the sorted list as primitive indices.
__global__ void list_ids(const int64_t* flat, const int32_t* owner, int64_t total,
                         int32_t* ids) {
  const int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (j < total) ids[j] = owner[flat[j]];
}

__global__ void range_counts(const int64_t* ranges, int64_t tiles, int32_t* counts) {
  const int64_t vt = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (vt < tiles) counts[vt] = (int32_t)(ranges[2 * vt + 1] - ranges[2 * vt]);
}

// The tile lists of one call (every view), in scratch memory.
struct Lists {
  int64_t total = 0;
  int64_t* ends = nullptr;     // [views * N] inclusive scan of the rectangle sizes
  int64_t* ranges = nullptr;   // [views * tiles, 2] each tile's [start, end)
  int32_t* ids = nullptr;      // [total] primitive of each sorted entry
  int64_t* flat = nullptr;     // [total] its primitive-major position
};

template <typename T>
T* allocate(ffi::ScratchAllocator& scratch, int64_t count) {
  auto p = scratch.Allocate(sizeof(T) * (size_t)std::max<int64_t>(count, 1), 256);
  return p.has_value() ? static_cast<T*>(*p) : nullptr;
}

ffi::Error launched(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("kaojax native rasterizer: ") + what + ": " +
                                cudaGetErrorString(err));
  return ffi::Error::Success();
}

ffi::Error out_of_memory() {
  return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                    "kaojax native rasterizer: no scratch memory for the tile lists");
}

// Sort-based binning of every view: keys [views, N], rects [views, N, 4].
ffi::Error bin_views(cudaStream_t stream, ffi::ScratchAllocator& scratch, const Grid& g,
                     const float* keys, const int32_t* rects, int64_t views, int64_t n,
                     Lists* out) {
  const int64_t count = views * n;
  const int64_t tiles = views * g.num_tiles();
  if (tiles >= ((int64_t)1 << 32)) return invalid("too many views x tiles for one call");
  out->ends = allocate<int64_t>(scratch, count);
  out->ranges = allocate<int64_t>(scratch, 2 * tiles);
  int64_t* sizes = allocate<int64_t>(scratch, count);
  if (!out->ends || !out->ranges || !sizes) return out_of_memory();
  cudaMemsetAsync(out->ranges, 0, sizeof(int64_t) * 2 * tiles, stream);
  if (count == 0) return launched("binning");
  rect_sizes<<<blocks_for(count), kThreads, 0, stream>>>(g, rects, count, sizes);
  size_t temp_bytes = 0;
  cub::DeviceScan::InclusiveSum(nullptr, temp_bytes, sizes, out->ends, count, stream);
  void* temp = allocate<char>(scratch, (int64_t)temp_bytes);
  if (!temp) return out_of_memory();
  cub::DeviceScan::InclusiveSum(temp, temp_bytes, sizes, out->ends, count, stream);
  cudaMemcpyAsync(&out->total, out->ends + count - 1, sizeof(int64_t), cudaMemcpyDeviceToHost,
                  stream);
  cudaStreamSynchronize(stream);
  if (auto e = launched("binning (scan)"); e.failure()) return e;
  const int64_t total = out->total;
  if (total == 0) return launched("binning");
  uint64_t* keys_in = allocate<uint64_t>(scratch, total);
  uint64_t* keys_out = allocate<uint64_t>(scratch, total);
  int64_t* values_in = allocate<int64_t>(scratch, total);
  int32_t* owner = allocate<int32_t>(scratch, total);
  out->flat = allocate<int64_t>(scratch, total);
  out->ids = allocate<int32_t>(scratch, total);
  if (!keys_in || !keys_out || !values_in || !owner || !out->flat || !out->ids)
    return out_of_memory();
  expand<<<blocks_for(count), kThreads, 0, stream>>>(g, keys, rects, out->ends, count, n,
                                                       keys_in, values_in, owner);
  int end_bit = 32;  // the depth bits, then as many as (view, tile) indices need
  while (end_bit < 64 && ((uint64_t)(tiles - 1) >> (end_bit - 32)) != 0) ++end_bit;
  temp_bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys_in, keys_out, values_in, out->flat,
                                  total, 0, end_bit, stream);
  temp = allocate<char>(scratch, (int64_t)temp_bytes);
  if (!temp) return out_of_memory();
  cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, values_in, out->flat,
                                  total, 0, end_bit, stream);
  tile_ranges<<<blocks_for(total), kThreads, 0, stream>>>(keys_out, total, out->ranges);
  list_ids<<<blocks_for(total), kThreads, 0, stream>>>(out->flat, owner, total, out->ids);
  return launched("binning");
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
                                  const int64_t* ranges, float* feats, float* trans,
                                  int32_t* last) {
  const PixelIndex p = pixel_of_thread(g);
  if (!p.inside) return;
  const int64_t start = ranges[2 * p.tile];
  composite_pixel<Kind>(prims + p.view * n * Kind::P, ids + start,
                        (int)(ranges[2 * p.tile + 1] - start), p.x + 0.5f, p.y + 0.5f,
                        feats + p.pixel * Kind::F, trans + p.pixel, last + p.pixel);
}

// Adds list entry j's gradient to its intersection slot (primitive-major).
template <int P>
struct SlotAdd {
  float* slots;
  const int64_t* flat;
  KJ_HD void operator()(int j, const float* dp) const {
#if defined(__CUDA_ARCH__)
    float* s = slots + flat[j] * P;
    for (int c = 0; c < P; ++c)
      if (dp[c] != 0.0f) atomicAdd(s + c, dp[c]);
#endif
  }
};

template <typename Kind>
__global__ void composite_backward(Grid g, const float* prims, int64_t n, const int32_t* ids,
                                   const int64_t* flat, const int64_t* ranges,
                                   const int32_t* last, const float* trans,
                                   const float* grad_feats, const float* grad_trans,
                                   float* slots) {
  const PixelIndex p = pixel_of_thread(g);
  if (!p.inside) return;
  const int64_t start = ranges[2 * p.tile];
  composite_pixel_vjp<Kind>(prims + p.view * n * Kind::P, ids + start, last[p.pixel],
                            p.x + 0.5f, p.y + 0.5f, trans[p.pixel],
                            grad_feats + p.pixel * Kind::F, grad_trans[p.pixel],
                            SlotAdd<Kind::P>{slots, flat + start});
}

// grad[i] = sum of primitive i's intersection slots, in rectangle order.
template <int P>
__global__ void sum_slots(const int64_t* ends, int64_t count, const float* slots,
                          float* grad) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= count) return;
  float g[P];
  for (int c = 0; c < P; ++c) g[c] = 0.0f;
  for (int64_t k = (i == 0 ? 0 : ends[i - 1]); k < ends[i]; ++k)
    for (int c = 0; c < P; ++c) g[c] += slots[k * P + c];
  for (int c = 0; c < P; ++c) grad[i * P + c] = g[c];
}

__global__ void mesh_visibility(Grid g, const float* tris, int64_t n, const int32_t* ids,
                                const int64_t* ranges, int32_t* face_id) {
  const PixelIndex p = pixel_of_thread(g);
  if (!p.inside) return;
  const int64_t start = ranges[2 * p.tile];
  face_id[p.pixel] = visible_face(tris + p.view * n * 9, ids + start,
                                  (int)(ranges[2 * p.tile + 1] - start), p.x + 0.5f,
                                  p.y + 0.5f);
}

// call_shape, plus the CUDA limit: one thread per pixel of a tile.
template <typename Prims, typename Keys, typename Rects>
ffi::Error cuda_call_shape(const Grid& g, const Prims& prims, int64_t params, const Keys& keys,
                           const Rects& rects, CallShape* shape) {
  if (g.tile_size * g.tile_size > 1024) return invalid("tile_size must be at most 32 on CUDA");
  return call_shape(g, prims, params, keys, rects, shape);
}

// Waits for the kernels before the scratch lists go back to XLA.
ffi::Error finished(cudaStream_t stream, const char* what) {
  if (auto e = launched(what); e.failure()) return e;
  cudaStreamSynchronize(stream);
  return launched(what);
}

template <typename Kind>
ffi::Error CompositeForward(cudaStream_t stream, ffi::ScratchAllocator scratch,
                            ffi::Buffer<ffi::F32> prims, ffi::Buffer<ffi::F32> keys,
                            ffi::Buffer<ffi::S32> rects, ffi::ResultBuffer<ffi::F32> feats,
                            ffi::ResultBuffer<ffi::F32> trans, ffi::ResultBuffer<ffi::S32> counts,
                            ffi::ResultBuffer<ffi::S32> last, int32_t width, int32_t height,
                            int32_t tile_size) {
  const Grid g = make_grid(width, height, tile_size);
  CallShape shape;
  if (auto e = cuda_call_shape(g, prims, Kind::P, keys, rects, &shape); e.failure()) return e;
  const int64_t n = shape.n, views = shape.views;
  const int64_t blocks = views * g.num_tiles();
  if (blocks == 0) return ffi::Error::Success();
  Lists lists;
  if (auto e = bin_views(stream, scratch, g, keys.typed_data(), rects.typed_data(), views, n,
                         &lists);
      e.failure())
    return e;
  range_counts<<<blocks_for(blocks), kThreads, 0, stream>>>(lists.ranges, blocks,
                                                            counts->typed_data());
  composite_forward<Kind><<<blocks, tile_size * tile_size, 0, stream>>>(
      g, prims.typed_data(), n, lists.ids, lists.ranges, feats->typed_data(),
      trans->typed_data(), last->typed_data());
  return finished(stream, "forward");
}

template <typename Kind>
ffi::Error CompositeBackward(cudaStream_t stream, ffi::ScratchAllocator scratch,
                             ffi::Buffer<ffi::F32> prims, ffi::Buffer<ffi::F32> keys,
                             ffi::Buffer<ffi::S32> rects, ffi::Buffer<ffi::S32> last,
                             ffi::Buffer<ffi::F32> trans, ffi::Buffer<ffi::F32> grad_feats,
                             ffi::Buffer<ffi::F32> grad_trans,
                             ffi::ResultBuffer<ffi::F32> grad_prims, int32_t width,
                             int32_t height, int32_t tile_size) {
  const Grid g = make_grid(width, height, tile_size);
  CallShape shape;
  if (auto e = cuda_call_shape(g, prims, Kind::P, keys, rects, &shape); e.failure()) return e;
  const int64_t n = shape.n, views = shape.views;
  cudaMemsetAsync(grad_prims->typed_data(), 0, grad_prims->size_bytes(), stream);
  const int64_t blocks = views * g.num_tiles();
  if (blocks == 0 || n == 0) return launched("backward");
  Lists lists;
  if (auto e = bin_views(stream, scratch, g, keys.typed_data(), rects.typed_data(), views, n,
                         &lists);
      e.failure())
    return e;
  if (lists.total == 0) return finished(stream, "backward");
  float* slots = allocate<float>(scratch, lists.total * Kind::P);
  if (!slots) return out_of_memory();
  cudaMemsetAsync(slots, 0, sizeof(float) * lists.total * Kind::P, stream);
  composite_backward<Kind><<<blocks, tile_size * tile_size, 0, stream>>>(
      g, prims.typed_data(), n, lists.ids, lists.flat, lists.ranges, last.typed_data(),
      trans.typed_data(), grad_feats.typed_data(), grad_trans.typed_data(), slots);
  sum_slots<Kind::P><<<blocks_for(views * n), kThreads, 0, stream>>>(
      lists.ends, views * n, slots, grad_prims->typed_data());
  return finished(stream, "backward");
}

ffi::Error MeshVisibility(cudaStream_t stream, ffi::ScratchAllocator scratch,
                          ffi::Buffer<ffi::F32> tris, ffi::Buffer<ffi::F32> keys,
                          ffi::Buffer<ffi::S32> rects, ffi::ResultBuffer<ffi::S32> face_id,
                          ffi::ResultBuffer<ffi::S32> counts, int32_t width, int32_t height,
                          int32_t tile_size) {
  const Grid g = make_grid(width, height, tile_size);
  CallShape shape;
  if (auto e = cuda_call_shape(g, tris, 9, keys, rects, &shape); e.failure()) return e;
  const int64_t n = shape.n, views = shape.views;
  const int64_t blocks = views * g.num_tiles();
  if (blocks == 0) return ffi::Error::Success();
  Lists lists;
  if (auto e = bin_views(stream, scratch, g, keys.typed_data(), rects.typed_data(), views, n,
                         &lists);
      e.failure())
    return e;
  range_counts<<<blocks_for(blocks), kThreads, 0, stream>>>(lists.ranges, blocks,
                                                            counts->typed_data());
  mesh_visibility<<<blocks, tile_size * tile_size, 0, stream>>>(
      g, tris.typed_data(), n, lists.ids, lists.ranges, face_id->typed_data());
  return finished(stream, "mesh visibility");
}

}  // namespace
}  // namespace kaojax

namespace ffi = xla::ffi;

// The stream, then XLA's scratch allocator for the tile lists.
#define KAOJAX_CUDA .Ctx<ffi::PlatformStream<cudaStream_t>>().Ctx<ffi::ScratchAllocator>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(kaojax_surfel_forward_cuda,
                              kaojax::CompositeForward<kaojax::SurfelKind>,
                              KAOJAX_FORWARD_BINDING(KAOJAX_CUDA));
XLA_FFI_DEFINE_HANDLER_SYMBOL(kaojax_surfel_backward_cuda,
                              kaojax::CompositeBackward<kaojax::SurfelKind>,
                              KAOJAX_BACKWARD_BINDING(KAOJAX_CUDA));
XLA_FFI_DEFINE_HANDLER_SYMBOL(kaojax_gaussian_forward_cuda,
                              kaojax::CompositeForward<kaojax::GaussianKind>,
                              KAOJAX_FORWARD_BINDING(KAOJAX_CUDA));
XLA_FFI_DEFINE_HANDLER_SYMBOL(kaojax_gaussian_backward_cuda,
                              kaojax::CompositeBackward<kaojax::GaussianKind>,
                              KAOJAX_BACKWARD_BINDING(KAOJAX_CUDA));
XLA_FFI_DEFINE_HANDLER_SYMBOL(kaojax_mesh_visibility_cuda, kaojax::MeshVisibility,
                              KAOJAX_MESH_BINDING(KAOJAX_CUDA));
