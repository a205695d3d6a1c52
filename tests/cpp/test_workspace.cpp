// detail::Workspace: a call's temporary arrays from memory its thread keeps.
#include <gtest/gtest.h>

#include <cstdint>
#include <thread>

#include "core/workspace.hpp"

namespace {

using normkit::detail::Workspace;

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % Workspace::kAlignment == 0; }

TEST(Workspace, TakeGivesZeroedAlignedArraysThatDoNotOverlap) {
  Workspace ws;
  const auto a = ws.take<double>(100);
  const auto b = ws.take<float>(3);
  const auto c = ws.take<int64_t>(1000);
  for (double v : a) EXPECT_EQ(v, 0.0);
  for (int64_t v : c) EXPECT_EQ(v, 0);
  EXPECT_TRUE(aligned(a.data()) && aligned(b.data()) && aligned(c.data()));
  EXPECT_EQ(a.size(), 100u);
  EXPECT_EQ(b.size(), 3u);
  const auto* end_a = reinterpret_cast<const char*>(a.data() + a.size());
  const auto* end_b = reinterpret_cast<const char*>(b.data() + b.size());
  EXPECT_LE(end_a, reinterpret_cast<const char*>(b.data()));
  EXPECT_LE(end_b, reinterpret_cast<const char*>(c.data()));
}

TEST(Workspace, ACallOfTheSameSizeGetsTheSameMemoryBack) {
  // A call that outgrows the arena's block (a 64 KB first block, then 1 MB);
  // once it has run, the arena holds it in one block, and it lands there.
  auto call = [] {
    Workspace ws;
    const void* start = ws.take<double>(5000).data();
    ws.take<float>(size_t{1} << 18);
    return start;
  };
  call();
  const void* second = call();
  EXPECT_EQ(call(), second);
  EXPECT_EQ(call(), second);
}

TEST(Workspace, NestedFramesStackAndGiveBackInOrder) {
  Workspace outer;
  const auto a = outer.take<double>(10);
  a[0] = 42;
  const void* inner_start = nullptr;
  {
    Workspace inner;
    const auto b = inner.take<double>(10);
    inner_start = b.data();
    EXPECT_NE(static_cast<const void*>(a.data()), inner_start);
    b[0] = 7;
  }
  EXPECT_EQ(a[0], 42);  // the callee's frame did not reach into the caller's
  const auto c = outer.take<double>(10);
  EXPECT_EQ(static_cast<const void*>(c.data()), inner_start);  // the callee's memory, reused
}

TEST(Workspace, CopyConvertsValues) {
  Workspace ws;
  const float values[] = {1.5f, -2.0f, 3.25f};
  const auto out = ws.copy<double>(std::span<const float>(values));
  ASSERT_EQ(out.size(), 3u);
  EXPECT_EQ(out[0], 1.5);
  EXPECT_EQ(out[1], -2.0);
  EXPECT_EQ(out[2], 3.25);
}

TEST(Workspace, EachThreadHasItsOwnArena) {
  Workspace ws;
  const void* here = ws.take<double>(10).data();
  const void* there = nullptr;
  std::thread([&] {
    Workspace other;
    there = other.take<double>(10).data();
  }).join();
  EXPECT_NE(here, there);
}

TEST(Workspace, EmptyAndHugeRequests) {
  Workspace ws;
  EXPECT_EQ(ws.take<double>(0).size(), 0u);
  const auto big = ws.take<float>(size_t{40} << 20);  // 160 MB: more than an arena keeps
  big[big.size() - 1] = 1.0f;
  EXPECT_EQ(big[0], 0.0f);
}

}  // namespace
