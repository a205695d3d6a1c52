// Tensor views and their geometry: layouts, dense strides, and geometry_of's
// [outer, C, inner] form for every layout, rows form, padding and size-1 axes.
// Expected geometries are worked out by hand from the sizes and strides.
#include "test_support.hpp"

namespace {

using namespace normkit_test;
using normkit::ErrorKind;
using normkit::Geometry;
using normkit::TensorView;

// Geometry of a view over `sizes` and `strides` (no data is read).
Geometry geometry(Layout layout, std::vector<int64_t> sizes, std::vector<int64_t> strides) {
  static float dummy = 0;
  return normkit::geometry_of(TensorView<const float>::strided(&dummy, sizes, strides, layout), "x");
}

Geometry geometry(Layout layout, std::vector<int64_t> sizes) {
  static float dummy = 0;
  return normkit::geometry_of(TensorView<const float>::contiguous(&dummy, sizes, layout), "x");
}

std::string show(const Geometry& g) {
  return "{outer " + std::to_string(g.outer) + ", channels " + std::to_string(g.channels) +
         ", inner " + std::to_string(g.inner) + "; strides " + std::to_string(g.outer_stride) +
         ", " + std::to_string(g.channel_stride) + ", " + std::to_string(g.inner_stride) + "}";
}

// {outer, channels, inner, outer_stride, channel_stride, inner_stride}
::testing::AssertionResult is_geometry(const Geometry& got, Geometry want) {
  if (got == want) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "got " << show(got) << ", expected " << show(want);
}

bool rows_form(const Geometry& g) { return g.inner == 1 && g.channel_stride == 1; }

TEST(Layout, RankChannelAxisAndName) {
  struct Row {
    Layout layout;
    int rank;
    bool channels_last;
    int channel_axis;
    const char* name;
  };
  for (const Row& r : {Row{Layout::NC, 2, false, 1, "NC"}, Row{Layout::NCL, 3, false, 1, "NCL"},
                       Row{Layout::NCHW, 4, false, 1, "NCHW"},
                       Row{Layout::NCDHW, 5, false, 1, "NCDHW"},
                       Row{Layout::NLC, 3, true, 2, "NLC"}, Row{Layout::NHWC, 4, true, 3, "NHWC"},
                       Row{Layout::NDHWC, 5, true, 4, "NDHWC"}}) {
    SCOPED_TRACE(r.name);
    EXPECT_EQ(normkit::rank_of(r.layout), r.rank);
    EXPECT_EQ(normkit::is_channels_last(r.layout), r.channels_last);
    EXPECT_EQ(normkit::channel_axis(r.layout), r.channel_axis);
    EXPECT_EQ(normkit::to_string(r.layout), r.name);
    EXPECT_EQ(normkit::layout_from_string(r.name), r.layout);
  }
}

TEST(Layout, FromStringIgnoresCase) {
  EXPECT_EQ(normkit::layout_from_string("nhwc"), Layout::NHWC);
  EXPECT_EQ(normkit::layout_from_string("nCdHw"), Layout::NCDHW);
}

TEST(Layout, FromStringRejectsUnknownNames) {
  for (const char* name : {"XYZ", "", "NCHWC", "NHW"}) {
    SCOPED_TRACE(name);
    EXPECT_TRUE(throws_error([&] { (void)normkit::layout_from_string(name); },
                             ErrorKind::invalid_argument,
                             {"unsupported layout '" + std::string(name) + "'", "NCHW", "NHWC"}));
  }
}

TEST(TensorView, ContiguousStridesFollowTheAxisOrder) {
  float data[1];
  const auto nchw = TensorView<float>::contiguous(data, {2, 3, 4, 5}, Layout::NCHW);
  EXPECT_EQ(nchw.rank(), 4);
  EXPECT_EQ(nchw.channels(), 3);
  EXPECT_EQ(nchw.numel(), 120);
  EXPECT_EQ((std::vector<int64_t>(nchw.strides.begin(), nchw.strides.begin() + 4)),
            (std::vector<int64_t>{60, 20, 5, 1}));
  const auto nhwc = TensorView<float>::contiguous(data, {2, 4, 5, 3}, Layout::NHWC);
  EXPECT_EQ(nhwc.channels(), 3);
  EXPECT_EQ((std::vector<int64_t>(nhwc.strides.begin(), nhwc.strides.begin() + 4)),
            (std::vector<int64_t>{60, 15, 3, 1}));
  EXPECT_EQ(nchw.shape_string(), "[2, 3, 4, 5] (NCHW)");
  EXPECT_EQ(nhwc.shape_string(), "[2, 4, 5, 3] (NHWC)");
}

TEST(TensorView, WrongNumberOfSizesThrows) {
  float data[8];
  EXPECT_TRUE(throws_error(
      [&] { (void)TensorView<float>::contiguous(data, {2, 3, 4}, Layout::NCHW); },
      ErrorKind::invalid_argument, {"NCHW", "needs 4 sizes", "got 3"}));
  EXPECT_TRUE(throws_error([&] { (void)TensorView<float>::contiguous(data, {8}, Layout::NC); },
                           ErrorKind::invalid_argument, {"NC", "needs 2 sizes", "got 1"}));
  const std::vector<int64_t> sizes = {2, 4}, strides = {4, 1, 1};
  EXPECT_TRUE(throws_error(
      [&] { (void)TensorView<float>::strided(data, sizes, strides, Layout::NC); },
      ErrorKind::invalid_argument, {"strides", "expected 2 strides, got 3"}));
}

TEST(TensorView, ConstConversionKeepsEverything) {
  float data[24];
  const std::vector<int64_t> sizes = {2, 3, 4}, strides = {13, 4, 1};
  const auto view = TensorView<float>::strided(data, sizes, strides, Layout::NCL);
  const TensorView<const float> cview = view;
  EXPECT_EQ(cview.data, data);
  EXPECT_EQ(cview.layout, Layout::NCL);
  EXPECT_EQ(cview.shape, view.shape);
  EXPECT_EQ(cview.strides, view.strides);
}

// Dense views, every layout: N = 2, C = 3, spatial (4), (4, 5) or (2, 4, 5).
TEST(Geometry, DenseChannelsFirst) {
  EXPECT_TRUE(is_geometry(geometry(Layout::NCL, {2, 3, 5}), {2, 3, 5, 15, 5, 1}));
  EXPECT_TRUE(is_geometry(geometry(Layout::NCHW, {2, 3, 4, 5}), {2, 3, 20, 60, 20, 1}));
  EXPECT_TRUE(is_geometry(geometry(Layout::NCDHW, {2, 3, 2, 4, 5}), {2, 3, 40, 120, 40, 1}));
}

TEST(Geometry, DenseChannelsLastIsRowsForm) {
  EXPECT_TRUE(is_geometry(geometry(Layout::NC, {4, 3}), {4, 3, 1, 3, 1, 1}));
  EXPECT_TRUE(is_geometry(geometry(Layout::NLC, {2, 5, 3}), {10, 3, 1, 3, 1, 1}));
  EXPECT_TRUE(is_geometry(geometry(Layout::NHWC, {2, 4, 5, 3}), {40, 3, 1, 3, 1, 1}));
  EXPECT_TRUE(is_geometry(geometry(Layout::NDHWC, {2, 2, 4, 5, 3}), {80, 3, 1, 3, 1, 1}));
  for (const Layout layout : {Layout::NC, Layout::NLC, Layout::NHWC, Layout::NDHWC}) {
    auto sizes = sizes_in(layout, Logical{2, 3, std::vector<int64_t>(spatial_rank(layout), 4)});
    EXPECT_TRUE(rows_form(geometry(layout, sizes))) << normkit::to_string(layout);
  }
  EXPECT_FALSE(rows_form(geometry(Layout::NCHW, {2, 3, 4, 5})));
}

TEST(Geometry, ChannelsLastStridesOnALogicalNchwViewAreRowsForm) {
  // PyTorch's channels_last: logical [N, C, H, W] = [2, 3, 4, 5] stored as NHWC.
  const Geometry g = geometry(Layout::NCHW, {2, 3, 4, 5}, {60, 1, 15, 3});
  EXPECT_TRUE(is_geometry(g, {40, 3, 1, 3, 1, 1}));
  EXPECT_TRUE(g == geometry(Layout::NHWC, {2, 4, 5, 3}));
}

TEST(Geometry, PaddedRowsKeepTheirStride) {
  // NHWC rows of C = 3 values every 8 elements.
  EXPECT_TRUE(is_geometry(geometry(Layout::NHWC, {2, 4, 5, 3}, {160, 40, 8, 1}), {40, 3, 1, 8, 1, 1}));
  EXPECT_TRUE(is_geometry(geometry(Layout::NC, {6, 3}, {7, 1}), {6, 3, 1, 7, 1, 1}));
  // Channels-last NCHW with padded rows: positions 8 apart, images 170 apart (= 20 * 8 + 10)
  // cannot merge N with H, W into one run of rows.
  EXPECT_TRUE(is_geometry(geometry(Layout::NCHW, {2, 3, 4, 5}, {170, 1, 40, 8}),
                          {2, 3, 20, 170, 1, 8}));
}

TEST(Geometry, PaddedOuterAndChannelStrides) {
  // A batch slice: 10 elements of padding after each [C, H, W] block.
  EXPECT_TRUE(is_geometry(geometry(Layout::NCHW, {2, 3, 4, 5}, {70, 20, 5, 1}), {2, 3, 20, 70, 20, 1}));
  // Channel blocks 23 apart (3 of padding each).
  EXPECT_TRUE(is_geometry(geometry(Layout::NCHW, {2, 3, 4, 5}, {72, 23, 5, 1}), {2, 3, 20, 72, 23, 1}));
}

TEST(Geometry, SizeOneAxesCarryNoConstraint) {
  // H = 1 with an arbitrary stride (PyTorch allows any stride for a size-1 axis).
  EXPECT_TRUE(is_geometry(geometry(Layout::NCHW, {2, 3, 1, 5}, {15, 5, 999, 1}), {2, 3, 5, 15, 5, 1}));
  // N = 1: outer is 1 and its stride is inner * inner_stride.
  EXPECT_TRUE(is_geometry(geometry(Layout::NCHW, {1, 3, 4, 5}), {1, 3, 20, 20, 20, 1}));
  EXPECT_TRUE(is_geometry(geometry(Layout::NCHW, {1, 3, 4, 5}, {12345, 20, 5, 1}), {1, 3, 20, 20, 20, 1}));
  // H = W = 1 in NCHW: channels are contiguous, one row of C per image: rows form.
  const Geometry ones = geometry(Layout::NCHW, {4, 3, 1, 1});
  EXPECT_TRUE(is_geometry(ones, {4, 3, 1, 3, 1, 1}));
  EXPECT_TRUE(rows_form(ones));
}

TEST(Geometry, OneRunPerChannelBecomesInner) {
  // A single channel: everything is one run, streamed as inner.
  EXPECT_TRUE(is_geometry(geometry(Layout::NC, {4, 1}), {1, 1, 4, 4, 1, 1}));
  EXPECT_TRUE(is_geometry(geometry(Layout::NHWC, {2, 4, 5, 1}), {1, 1, 40, 40, 1, 1}));
  // NLC with N = 1 whose channels are strided (a transposed NCL buffer): each
  // channel is one contiguous run.
  EXPECT_TRUE(is_geometry(geometry(Layout::NLC, {1, 5, 3}, {15, 1, 5}), {1, 3, 5, 5, 5, 1}));
}

TEST(Geometry, EmptyViewsHaveNoExtent) {
  EXPECT_EQ(geometry(Layout::NCHW, {0, 3, 4, 5}).reduction_size(), 0);
  EXPECT_EQ(geometry(Layout::NHWC, {2, 0, 5, 3}).reduction_size(), 0);
}

TEST(Geometry, OffsetAddressesTheElement) {
  // Element (n, c, h, w) of a padded NCHW view sits at n*70 + c*20 + h*5 + w.
  const Geometry g = geometry(Layout::NCHW, {2, 3, 4, 5}, {70, 20, 5, 1});
  EXPECT_EQ(g.offset(1, 2, 13), 70 + 40 + 13);
  EXPECT_TRUE(g.same_extent(geometry(Layout::NCHW, {2, 3, 4, 5})));
  EXPECT_FALSE(g.same_extent(geometry(Layout::NCHW, {2, 3, 4, 6})));
}

TEST(Geometry, NonCollapsibleStridesThrowNamingTheArgument) {
  static float dummy = 0;
  // NCHW with padded W rows: H and W do not form one run.
  const std::vector<int64_t> sizes = {2, 3, 4, 5}, pitched = {96, 32, 8, 1};
  EXPECT_TRUE(throws_error(
      [&] {
        (void)normkit::geometry_of(
            TensorView<const float>::strided(&dummy, sizes, pitched, Layout::NCHW), "dy");
      },
      ErrorKind::invalid_argument, {"dy:", "strides of [2, 3, 4, 5] (NCHW)", "contiguous"}));
  // A transposed NCL buffer seen as NLC with N = 2: N and L do not collapse.
  const std::vector<int64_t> nlc = {2, 5, 3}, transposed = {15, 1, 5};
  EXPECT_TRUE(throws_error(
      [&] {
        (void)normkit::geometry_of(
            TensorView<const float>::strided(&dummy, nlc, transposed, Layout::NLC), "x");
      },
      ErrorKind::invalid_argument, {"x:", "[2, 5, 3] (NLC)"}));
}

TEST(Geometry, NegativeSizesAndStridesThrow) {
  static float dummy = 0;
  const std::vector<int64_t> sizes = {2, 3, 4}, negative = {12, -4, 1};
  EXPECT_TRUE(throws_error(
      [&] {
        (void)normkit::geometry_of(
            TensorView<const float>::strided(&dummy, sizes, negative, Layout::NCL), "x");
      },
      ErrorKind::invalid_argument, {"x:", "negative strides"}));
  auto view = TensorView<const float>::contiguous(&dummy, {2, 3, 4}, Layout::NCL);
  view.shape[2] = -4;
  EXPECT_TRUE(throws_error([&] { (void)normkit::geometry_of(view, "x"); },
                           ErrorKind::invalid_argument, {"x:", "negative size"}));
}

}  // namespace
