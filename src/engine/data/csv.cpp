// CSV tables: numeric features and one label column (class indices or names).
#include <algorithm>
#include <charconv>
#include <cmath>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <string_view>

#include "normkit/engine/data.hpp"
#include "support.hpp"

namespace normkit::data {

using engine::fail_runtime;

namespace {

constexpr uintmax_t kReserveValues = uintmax_t{1} << 28;

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

// The fields of one line (RFC 4180 quoting within a line: "a,b" is one field,
// "" inside quotes is a quote), each trimmed of surrounding blanks.
std::vector<std::string> split(std::string_view line, char delimiter, const std::string& where) {
  std::vector<std::string> fields;
  std::string field;
  bool quoted = false, was_quoted = false;
  for (size_t i = 0; i <= line.size(); ++i) {
    if (i == line.size() || (!quoted && line[i] == delimiter)) {
      if (quoted) fail_runtime(where, ": a quoted field is not closed");
      fields.push_back(was_quoted ? field : std::string(trim(field)));
      field.clear();
      was_quoted = false;
      continue;
    }
    const char ch = line[i];
    if (ch == '"' && quoted) {
      if (i + 1 < line.size() && line[i + 1] == '"') {
        field += '"';
        ++i;
      } else {
        quoted = false;
      }
    } else if (ch == '"' && trim(field).empty() && !was_quoted) {
      quoted = was_quoted = true;
      field.clear();
    } else if (!quoted && was_quoted) {
      if (ch != ' ' && ch != '\t' && ch != '\r')
        fail_runtime(where, ": text after a quoted field ('", std::string(1, ch), "')");
    } else {
      field += ch;
    }
  }
  return fields;
}

std::optional<double> number_of(std::string_view text) {
  if (!text.empty() && text.front() == '+') text.remove_prefix(1);
  double value = 0;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (text.empty() || error != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return value;
}

bool whole_number(std::string_view text, int64_t min, int64_t& value) {
  const auto v = number_of(text);
  if (!v || *v != std::floor(*v) || *v < static_cast<double>(min) || *v > 1e9) return false;
  value = static_cast<int64_t>(*v);
  return true;
}

// A field as it reads in a message: quoted, and cut when long.
std::string shown(const std::string& text) {
  return "'" + (text.size() > 40 ? text.substr(0, 37) + "..." : text) + "'";
}

// scikit-learn's header: n_samples, n_features, then the class names (none for
// a regression target), with n_features + 1 columns in the rows.
struct SklearnHeader {
  int64_t samples = 0;
  std::vector<std::string> class_names;
};
std::optional<SklearnHeader> sklearn_header(const std::vector<std::string>& fields,
                                            const std::vector<std::string>* next_row) {
  int64_t samples = 0, features = 0;
  if (fields.size() < 2 || !whole_number(fields[0], 1, samples) || !whole_number(fields[1], 1, features))
    return std::nullopt;
  for (size_t i = 2; i < fields.size(); ++i)
    if (number_of(fields[i])) return std::nullopt;
  // Its rows hold the features and a numeric target (a data table whose first
  // rows end in class names does not look like this).
  if (next_row && (static_cast<int64_t>(next_row->size()) != features + 1 ||
                   !number_of(next_row->back())))
    return std::nullopt;
  return SklearnHeader{samples, {fields.begin() + 2, fields.end()}};
}

class Reader {
 public:
  Reader(const std::filesystem::path& path, char delimiter)
      : in_(path), path_(path.string()), delimiter_(delimiter) {
    if (!in_) fail_runtime(path_, ": cannot open");
  }
  // The next non-blank line's fields; false at the end. A line without quotes
  // (nearly every line of a numeric table) is cut at the delimiters into the
  // strings `fields` already holds, reusing their storage.
  bool next(std::vector<std::string>& fields, int64_t& line_number) {
    while (std::getline(in_, line_)) {
      ++line_number_;
      if (trim(line_).empty()) continue;
      line_number = line_number_;
      if (line_.find('"') != std::string::npos) {
        fields = split(line_, delimiter_, location(line_number_));
        return true;
      }
      const std::string_view line = line_;
      size_t count = 0;
      for (size_t start = 0;; ++count) {
        const size_t end = std::min(line.find(delimiter_, start), line.size());
        if (count == fields.size()) fields.emplace_back();
        fields[count].assign(trim(line.substr(start, end - start)));
        if (end == line.size()) break;
        start = end + 1;
      }
      fields.resize(count + 1);
      return true;
    }
    if (in_.bad()) fail_runtime(path_, ": read error after line ", line_number_);
    return false;
  }
  std::string location(int64_t line) const { return path_ + ":" + std::to_string(line); }
  const std::string& path() const { return path_; }

 private:
  std::ifstream in_;
  std::string path_;
  char delimiter_;
  std::string line_;
  int64_t line_number_ = 0;
};

}  // namespace

Dataset load_csv(const std::filesystem::path& path, const CsvOptions& options) {
  if (options.num_classes < 0)
    engine::fail_invalid("num_classes must be >= 0 (0: infer), got ", options.num_classes);
  if (options.delimiter == '"' || options.delimiter == '\n' || options.delimiter == '\r')
    engine::fail_invalid("the CSV delimiter cannot be a quote or a line break");
  Reader reader(path, options.delimiter);
  const std::string& where = reader.path();

  // The first two rows decide whether the first is a header.
  std::vector<std::string> first, second;
  int64_t first_line = 0, second_line = 0;
  const bool has_first = reader.next(first, first_line);
  const bool has_second = has_first && reader.next(second, second_line);
  if (!has_first) fail_runtime(where, ": no data rows");
  std::optional<SklearnHeader> sklearn;
  std::vector<std::string> names;  // column names, from a header of names
  bool header = options.header == CsvHeader::yes;
  if (options.header != CsvHeader::no) {
    sklearn = sklearn_header(first, has_second ? &second : nullptr);
    if (sklearn) {
      header = true;
    } else if (options.header == CsvHeader::detect) {
      for (size_t c = 0; c < first.size() && !header; ++c)
        header = !number_of(first[c]) && (!has_second || (c < second.size() && number_of(second[c])));
    }
    if (header && !sklearn) names = first;
  }
  const std::vector<std::string>& row_shape = header ? second : first;
  if (header && !has_second) fail_runtime(where, ": no data rows (only the header line)");
  const auto columns = static_cast<int64_t>(row_shape.size());
  const int64_t shape_line = header ? second_line : first_line;
  const bool unlabelled = options.label_column == "none";
  if (columns < (unlabelled ? 1 : 2))
    fail_runtime(where, ":", header ? second_line : first_line,
                 ": need at least one feature and a label column, got ", columns, " column");

  // The label column, counted from 0 here and from 1 in every message.
  int64_t label = -1;
  const std::string& wanted = options.label_column;
  int64_t number = 0;
  if (unlabelled) {
    label = -1;
  } else if (wanted == "last" || wanted.empty()) {
    label = columns - 1;
  } else if (wanted == "first") {
    label = 0;
  } else if (whole_number(wanted, 1, number)) {
    if (number > columns)
      fail_runtime(where, ": label column ", number, " does not exist (the rows have ", columns,
                   " columns, counted from 1)");
    label = number - 1;
  } else if (number_of(wanted)) {
    engine::fail_invalid("label column ", shown(wanted),
                         ": columns are counted from 1 (or give last, first or a column's name)");
  } else {
    const auto it = std::find(names.begin(), names.end(), wanted);
    if (it == names.end()) {
      if (names.empty())
        fail_runtime(where, ": label column ", shown(wanted),
                     " is not a column number, and the table has no header line of names");
      std::string all;
      for (const auto& n : names) all += (all.empty() ? "" : ", ") + n;
      fail_runtime(where, ": no column named ", shown(wanted), " in the header (", all, ")");
    }
    label = it - names.begin();
  }
  auto column_text = [&](int64_t c) {
    std::string text = "column " + std::to_string(c + 1);
    if (c < static_cast<int64_t>(names.size()) && !names[c].empty()) text += " (" + names[c] + ")";
    return text;
  };

  Dataset set;
  set.sample_shape = {unlabelled ? columns : columns - 1};
  // Room for every feature before the rows are read (growing by doubling
  // copied a 60k-row table's features several times, each copy to fresh
  // pages): a value takes at least two bytes of the file, a digit and a
  // delimiter or line break, so about size/2 values at most. Only address
  // space until written; beyond 2^28 values the vector grows as rows arrive.
  {
    std::error_code ec;
    const auto bytes = std::filesystem::file_size(path, ec);
    if (!ec) engine::reserve_hint(set.features, std::min<uintmax_t>(bytes / 2, kReserveValues));
  }
  // Each row's label and line, until the kind of labels is known.
  std::vector<std::string> label_texts;
  std::vector<int64_t> label_lines;
  int64_t numeric_line = 0, named_line = 0;
  std::string numeric_example, named_example;
  auto add_row = [&](const std::vector<std::string>& fields, int64_t line) {
    const std::string at = reader.location(line);
    if (static_cast<int64_t>(fields.size()) != columns)
      fail_runtime(at, ": expected ", columns, " columns (as line ", shape_line, "), got ", fields.size());
    for (int64_t c = 0; c < columns; ++c) {
      const std::string& field = fields[c];
      if (c == label) {
        if (field.empty()) fail_runtime(at, ": ", column_text(c), ": the label is empty");
        if (const auto v = number_of(field)) {
          int64_t index = 0;
          if (!whole_number(field, 0, index))
            fail_runtime(at, ": ", column_text(c), ": label ", field, " is not a class index (a whole number >= 0) ",
                         "or a class name");
          if (!numeric_line) numeric_line = line, numeric_example = field;
        } else if (!named_line) {
          named_line = line, named_example = field;
        }
        label_texts.push_back(field);
        label_lines.push_back(line);
        continue;
      }
      const auto v = number_of(field);
      if (!v)
        fail_runtime(at, ": ", column_text(c), ": ", field.empty() ? "the field is empty" : shown(field) + " is not a number");
      if (!std::isfinite(*v)) fail_runtime(at, ": ", column_text(c), ": ", shown(field), " is not a finite number");
      // Features are floats: a larger magnitude would become ±inf there.
      if (std::fabs(*v) > std::numeric_limits<float>::max())
        fail_runtime(at, ": ", column_text(c), ": ", shown(field),
                     " is beyond a float's range (magnitude at most 3.4e38)");
      set.features.push_back(static_cast<float>(*v));
    }
  };
  if (!header) add_row(first, first_line);
  if (has_second) add_row(second, second_line);
  std::vector<std::string> fields;
  for (int64_t line = 0; reader.next(fields, line);) add_row(fields, line);
  // Values of many digits leave most of that room unused: keep at most twice
  // what the table holds (one copy, where growing by doubling took several).
  if (set.features.capacity() > 2 * set.features.size()) set.features.shrink_to_fit();
  if (unlabelled) {
    if (set.features.empty()) fail_runtime(where, ": no data rows");
    set.labels.assign(set.features.size() / static_cast<size_t>(columns), -1);
    return set;
  }
  if (label_texts.empty()) fail_runtime(where, ": no data rows");
  if (sklearn && sklearn->samples != static_cast<int64_t>(label_texts.size()))
    fail_runtime(where, ": the header says ", sklearn->samples, " samples, the file has ",
                 label_texts.size(), " rows (truncated?)");

  // Class indices or class names; not both.
  if (numeric_line && named_line)
    fail_runtime(where, ": ", column_text(label), " holds class indices (line ", numeric_line, ": ",
                 numeric_example, ") and class names (line ", named_line, ": ", shown(named_example),
                 "); use one or the other");
  std::vector<std::string> classes = options.class_names;
  if (classes.empty() && sklearn) classes = sklearn->class_names;
  if (named_line && classes.empty()) {  // names, in sorted order
    classes = label_texts;
    std::sort(classes.begin(), classes.end());
    classes.erase(std::unique(classes.begin(), classes.end()), classes.end());
  }
  std::map<std::string, int32_t> index_of;
  for (size_t i = 0; i < classes.size(); ++i) index_of.emplace(classes[i], static_cast<int32_t>(i));
  int32_t max_label = -1;
  set.labels.reserve(label_texts.size());
  for (size_t row = 0; row < label_texts.size(); ++row) {
    const std::string& text = label_texts[row];
    const std::string at = reader.location(label_lines[row]);
    int32_t index = 0;
    if (named_line) {
      const auto it = index_of.find(text);
      if (it == index_of.end()) {
        std::string all;
        for (const auto& c : classes) all += (all.empty() ? "" : ", ") + c;
        fail_runtime(at, ": class ", shown(text), " is not one of the classes it must use (", all, ")");
      }
      index = it->second;
    } else {
      int64_t value = 0;
      whole_number(text, 0, value);
      if (options.num_classes > 0 && value >= options.num_classes)
        fail_runtime(at, ": label ", value, " is out of range [0, ", options.num_classes, ")");
      if (!classes.empty() && value >= static_cast<int64_t>(classes.size()))
        fail_runtime(at, ": label ", value, " has no class name (there are ", classes.size(), ")");
      index = static_cast<int32_t>(value);
    }
    max_label = std::max(max_label, index);
    set.labels.push_back(index);
  }
  set.num_classes = options.num_classes > 0 ? options.num_classes
                    : !classes.empty()      ? static_cast<int32_t>(classes.size())
                                            : max_label + 1;
  if (!classes.empty() && static_cast<int32_t>(classes.size()) != set.num_classes)
    fail_runtime(where, ": ", classes.size(), " class names for ", set.num_classes, " classes");
  set.class_names = std::move(classes);
  return set;
}

}  // namespace normkit::data
