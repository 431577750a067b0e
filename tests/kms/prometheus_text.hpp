// A strict reader of the Prometheus text exposition format 0.0.4, for tests: checks the
// HELP / TYPE lines, metric and label names, label-value escaping and sample values, and
// returns the samples keyed by "name{label="value",...}" (labels as written, unescaped).
#pragma once

#include <cmath>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>

namespace qkd::test {

struct Exposition {
  std::map<std::string, double> samples;    // "name{a=\"x\",b=\"y\"}" -> value (unescaped)
  std::map<std::string, std::string> types;  // family -> type
  std::string error;                         // empty when the text is valid
};

inline Exposition parse_exposition(const std::string& text) {
  Exposition e;
  static const std::regex kName("[a-zA-Z_:][a-zA-Z0-9_:]*");
  static const std::regex kLabelName("[a-zA-Z_][a-zA-Z0-9_]*");
  static const std::set<std::string> kTypes = {"counter", "gauge", "histogram", "summary",
                                               "untyped"};
  std::set<std::string> helps;
  std::istringstream in(text);
  std::string line;
  int n = 0;
  auto fail = [&](const std::string& why) {
    e.error = "line " + std::to_string(n) + ": " + why + ": " + line;
    return e;
  };
  if (text.empty() || text.back() != '\n') {
    e.error = "the exposition must end with a line feed";
    return e;
  }
  while (std::getline(in, line)) {
    ++n;
    if (line.rfind("# HELP ", 0) == 0 || line.rfind("# TYPE ", 0) == 0) {
      const std::string rest = line.substr(7);
      const auto sp = rest.find(' ');
      const std::string name = rest.substr(0, sp);
      if (!std::regex_match(name, kName) || sp == std::string::npos) {
        return fail("bad HELP/TYPE line");
      }
      if (line[2] == 'H') {
        if (!helps.insert(name).second) {
          return fail("second HELP for " + name);
        }
      } else {
        const std::string type = rest.substr(sp + 1);
        if (!kTypes.contains(type)) {
          return fail("unknown type");
        }
        if (!e.types.emplace(name, type).second) {
          return fail("second TYPE for " + name);
        }
      }
      continue;
    }
    if (line.empty() || line[0] == '#') {
      return fail("unexpected line");
    }
    // name{labels} value
    std::size_t i = 0;
    while (i < line.size() && line[i] != '{' && line[i] != ' ') {
      ++i;
    }
    const std::string name = line.substr(0, i);
    if (!std::regex_match(name, kName)) {
      return fail("bad metric name");
    }
    std::string key = name;
    if (i < line.size() && line[i] == '{') {
      key += '{';
      ++i;
      bool first = true;
      while (i < line.size() && line[i] != '}') {
        if (!first) {
          if (line[i] != ',') {
            return fail("expected ,");
          }
          ++i;
        }
        first = false;
        const auto eq = line.find('=', i);
        if (eq == std::string::npos) {
          return fail("label without =");
        }
        const std::string lname = line.substr(i, eq - i);
        if (!std::regex_match(lname, kLabelName)) {
          return fail("bad label name");
        }
        i = eq + 1;
        if (i >= line.size() || line[i] != '"') {
          return fail("label value must be quoted");
        }
        ++i;
        std::string value;
        for (;;) {
          if (i >= line.size()) {
            return fail("unterminated label value");
          }
          const char c = line[i++];
          if (c == '"') {
            break;
          }
          if (c == '\\') {
            if (i >= line.size()) {
              return fail("dangling backslash");
            }
            const char x = line[i++];
            if (x == 'n') {
              value += '\n';
            } else if (x == '\\' || x == '"') {
              value += x;
            } else {
              return fail("bad escape");
            }
          } else {
            value += c;
          }
        }
        key += (key.back() == '{' ? "" : ",") + lname + "=\"" + value + "\"";
      }
      if (i >= line.size()) {
        return fail("unterminated label set");
      }
      ++i;  // '}'
      key += '}';
    }
    if (i >= line.size() || line[i] != ' ') {
      return fail("expected a space before the value");
    }
    const std::string value = line.substr(i + 1);
    double v = 0;
    if (value == "+Inf") {
      v = HUGE_VAL;
    } else if (value == "-Inf") {
      v = -HUGE_VAL;
    } else if (value == "NaN") {
      v = NAN;
    } else {
      static const std::regex kFloat("-?[0-9]+(\\.[0-9]+)?([eE][-+]?[0-9]+)?");
      if (!std::regex_match(value, kFloat)) {
        return fail("bad value");
      }
      v = std::stod(value);
    }
    // The family of the sample must have been typed before it.
    std::string family = name;
    for (const char* suffix : {"_bucket", "_sum", "_count"}) {
      const std::string s(suffix);
      if (family.size() > s.size() && family.compare(family.size() - s.size(), s.size(), s) == 0 &&
          e.types.contains(family.substr(0, family.size() - s.size())) &&
          e.types.at(family.substr(0, family.size() - s.size())) == "histogram") {
        family = family.substr(0, family.size() - s.size());
        break;
      }
    }
    if (!e.types.contains(family)) {
      return fail("sample before its TYPE line");
    }
    if (!e.samples.emplace(key, v).second) {
      return fail("duplicate sample");
    }
  }
  return e;
}

}  // namespace qkd::test
