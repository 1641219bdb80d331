// Per-view geometry of the tile grid and the checks on the buffers that XLA
// hands to a handler; shared by the CPU and CUDA backends.
#pragma once

#include <cstdint>
#include <string>

#include "raster_math.h"
#include "xla/ffi/api/ffi.h"

namespace kaojax {

namespace ffi = xla::ffi;

struct Grid {
  int width, height, tile_size, tiles_x, tiles_y;
  KJ_HD int num_tiles() const { return tiles_x * tiles_y; }
  KJ_HD int pixels() const { return width * height; }
};

inline Grid make_grid(int32_t width, int32_t height, int32_t tile_size) {
  Grid g{width, height, tile_size, 0, 0};
  if (tile_size > 0) {
    g.tiles_x = (width + tile_size - 1) / tile_size;
    g.tiles_y = (height + tile_size - 1) / tile_size;
  }
  return g;
}

// The batch of views is every axis in front of the last `trailing` ones.
template <typename B>
int64_t leading(const B& buf, int trailing) {
  auto dims = buf.dimensions();
  int64_t n = 1;
  for (int i = 0; i + trailing < (int)dims.size(); ++i) n *= dims[i];
  return n;
}

template <typename B>
int64_t dim_from_end(const B& buf, int k) {
  auto dims = buf.dimensions();
  return (int)dims.size() >= k ? dims[dims.size() - k] : -1;
}

inline ffi::Error invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("kaojax native rasterizer: " + what);
}

}  // namespace kaojax
