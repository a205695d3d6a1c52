#include "core/workspace.hpp"

#include <algorithm>
#include <new>
#include <vector>

namespace normkit::detail {
namespace {

struct FreeAligned {
  void operator()(std::byte* p) const {
    ::operator delete(p, std::align_val_t{Workspace::kAlignment});
  }
};

struct Block {
  std::unique_ptr<std::byte, FreeAligned> data;
  size_t size = 0;
};

Block new_block(size_t size) {
  return {std::unique_ptr<std::byte, FreeAligned>(static_cast<std::byte*>(
              ::operator new(size, std::align_val_t{Workspace::kAlignment}))),
          size};
}

// The first block, and the least a new one holds.
constexpr size_t kMinBlock = size_t{64} << 10;
// What a thread keeps once its calls are done: an arena grown past this by an
// unusually large call is freed rather than held for the thread's lifetime.
constexpr size_t kKeepBytes = size_t{64} << 20;

// One thread's memory: blocks used in order; the top of the stack of frames
// is `used` bytes into blocks[block].
struct Arena {
  std::vector<Block> blocks;
  size_t block = 0, used = 0;
  int frames = 0;

  size_t total() const {
    size_t sum = 0;
    for (const Block& b : blocks) sum += b.size;
    return sum;
  }
  // No frame open: a call that spilled into several blocks leaves one block
  // of their total, so that a call of the same size fits it next time.
  // (From a destructor: a failed allocation leaves the arena empty, to grow
  // again on the next call, rather than throwing.)
  void settle() noexcept {
    if (blocks.size() <= 1 && total() <= kKeepBytes) return;
    const size_t size = total();
    blocks.clear();
    if (size > kKeepBytes) return;
    try {
      blocks.push_back(new_block(size));
    } catch (const std::bad_alloc&) {
    }
  }
};

thread_local Arena arena;

}  // namespace

Workspace::Workspace() : block_(arena.block), used_(arena.used) { ++arena.frames; }

Workspace::~Workspace() {
  arena.block = block_;
  arena.used = used_;
  if (--arena.frames == 0) arena.settle();
}

void* Workspace::bytes(size_t size) {
  size = (std::max<size_t>(size, 1) + kAlignment - 1) / kAlignment * kAlignment;
  Arena& a = arena;
  // The first block from the top on that has room: a frame's arrays never
  // straddle blocks, so what a block cannot hold moves on to the next.
  for (; a.block < a.blocks.size(); ++a.block, a.used = 0) {
    Block& b = a.blocks[a.block];
    if (b.size - a.used >= size) {
      std::byte* p = b.data.get() + a.used;
      a.used += size;
      return p;
    }
  }
  const size_t grown = a.blocks.empty() ? 0 : 2 * a.blocks.back().size;
  a.blocks.push_back(new_block(std::max({size, grown, kMinBlock})));
  a.block = a.blocks.size() - 1;
  a.used = size;
  return a.blocks.back().data.get();
}

}  // namespace normkit::detail
