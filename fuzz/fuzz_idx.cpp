// IDX image and label files (data::load_idx), plain or gzipped. Byte 0 picks
// the mode (even: the files are the bytes as given, which zlib reads as plain
// or, with a gzip header, as compressed data; odd: they are gzipped here, so
// the fuzzed IDX bytes are read through zlib's decompression); bytes 1-2 say
// where the image file ends and the label file starts. An accepted pair is a
// consistent data set: pixels in [0, 1], one label in [0, 10) per image.
#include <zlib.h>

#include <algorithm>

#include "fuzz_support.hpp"
#include "normkit/engine/data.hpp"

namespace {

std::string gzipped(std::string_view bytes) {
  z_stream z{};
  if (deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK)
    normkit::fuzz::property_failed("deflateInit2");
  std::string out(deflateBound(&z, bytes.size()), '\0');
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(bytes.data()));
  z.avail_in = static_cast<uInt>(bytes.size());
  z.next_out = reinterpret_cast<Bytef*>(out.data());
  z.avail_out = static_cast<uInt>(out.size());
  if (deflate(&z, Z_FINISH) != Z_STREAM_END) normkit::fuzz::property_failed("deflate");
  out.resize(z.total_out);
  deflateEnd(&z);
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace nd = normkit::data;
  using normkit::fuzz::expect;
  if (size < 3) return 0;
  const bool gzip = data[0] % 2 == 1;
  const std::string_view rest(reinterpret_cast<const char*>(data) + 3, size - 3);
  const size_t split = std::min<size_t>(rest.size(), size_t{data[1]} | size_t{data[2]} << 8);
  std::string images(rest.substr(0, split)), labels(rest.substr(split));
  if (gzip) {
    images = gzipped(images);
    labels = gzipped(labels);
  }
  const auto image_path = normkit::fuzz::write_scratch_file("images-idx3-ubyte.gz", images);
  const auto label_path = normkit::fuzz::write_scratch_file("labels-idx1-ubyte.gz", labels);
  nd::Dataset set;
  if (!normkit::fuzz::accepted([&] { set = nd::load_idx(image_path, label_path); })) return 0;

  expect(set.count() > 0 && set.num_classes == 10, "images and ten classes");
  expect(set.sample_shape.size() == 3 && set.sample_shape[0] == 1 && set.sample_shape[1] > 0 &&
             set.sample_shape[2] > 0,
         "samples are 1 x H x W");
  expect(static_cast<int64_t>(set.features.size()) == set.count() * set.sample_size(),
         "one image per label");
  for (const auto label : set.labels) expect(label >= 0 && label < 10, "labels in range");
  for (const auto v : set.features) expect(v >= 0.0f && v <= 1.0f, "pixels in [0, 1]");
  return 0;
}
