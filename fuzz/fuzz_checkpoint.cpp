// Checkpoints (io::from_bytes, what load_checkpoint runs on a file's bytes).
// The first byte picks the mode:
//   even: the rest is a whole file, header and checksum included;
//   odd:  the rest is the content section, wrapped here in a header and a
//         CRC32 that are right, so mutations reach the checks behind them
//         (lengths, the spec, arrays against the model, the optimizer).
// An accepted checkpoint must build its model and optimizer (load_checkpoint
// promises that build_* cannot fail on its result), whose model trains a step
// (fuzz_model.hpp), and survive a save/load round trip unchanged.
#include <zlib.h>

#include <cstring>

#include "fuzz_model.hpp"
#include "normkit/engine/checkpoint.hpp"

namespace {

namespace io = normkit::io;

std::vector<char> sealed(const uint8_t* content, size_t size) {
  std::vector<char> bytes;
  auto put = [&](const void* data, size_t n) {
    const size_t at = bytes.size();
    bytes.resize(at + n);
    if (n > 0) std::memcpy(bytes.data() + at, data, n);
  };
  constexpr char kMagic[8] = {'\x89', 'N', 'K', 'C', 'K', 'P', 'T', '\n'};
  const uint32_t version = io::kCheckpointVersion;
  const uint64_t content_size = size;
  put(kMagic, sizeof kMagic);
  put(&version, sizeof version);
  put(&content_size, sizeof content_size);
  put(content, size);
  const auto crc = static_cast<uint32_t>(
      crc32_z(crc32_z(0, Z_NULL, 0), reinterpret_cast<const Bytef*>(bytes.data()), bytes.size()));
  put(&crc, sizeof crc);
  return bytes;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using normkit::fuzz::expect;
  if (size == 0) return 0;
  const std::vector<char> bytes =
      data[0] % 2 == 1 ? sealed(data + 1, size - 1)
                       : std::vector<char>(reinterpret_cast<const char*>(data) + 1,
                                           reinterpret_cast<const char*>(data) + size);
  io::Checkpoint checkpoint;
  if (!normkit::fuzz::accepted([&] { checkpoint = io::from_bytes(bytes, "fuzz.nkc"); })) return 0;

  const auto model = io::build_model(checkpoint);
  const auto optimizer = io::build_optimizer(checkpoint, *model);
  expect(optimizer != nullptr || checkpoint.optimizer.name.empty(), "the saved optimizer builds");
  normkit::fuzz::exercise_model(*model);

  // What to_bytes writes reads back to the same checkpoint: a second round
  // trip gives the same bytes (the first may normalize the spec's text).
  const std::vector<char> saved = io::to_bytes(checkpoint);
  const std::vector<char> again = io::to_bytes(io::from_bytes(saved, "saved.nkc"));
  expect(saved == again, "to_bytes(from_bytes(to_bytes(c))) == to_bytes(c)");
  return 0;
}
