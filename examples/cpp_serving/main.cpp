// canet_serve: top-k recommendations from a CANet AOTInductor package, in C++.
//
//   canet_serve PACKAGE.pt2 [options] [ITEM ...]
//
// The package comes from canet_kernels.serving.export_package (or
// `python -m canet_kernels.serving export`): router, routed supernet and
// scoring in one compiled graph. The "ops" variant calls the canet ops
// (torch.ops.canet.*), which run from libcanet.so: this program links it (so
// it is loaded, and the ops registered, before the package is); the "plain"
// variant needs libtorch only. No Python at run time.
//
// ITEMs: one user's history, item ids in time order. Without ITEMs, one
// history per line is read from stdin (ids separated by spaces or commas)
// and one result per line is printed.
//
// Options:
//   -k K          items to return (1..the package's k; default: the package's k)
//   --route R     force route id R (the router still runs; default: its choice)
//   --keep-seen   do not exclude the history's items from the ranking
//   --json        one JSON object per history: items, scores, route, emb,
//                 hidden, depth
//   --threads N   intra-op threads (at::set_num_threads)
//   --bench N     also time N runs of each request; p50 / p99 to stderr
//
// Exit status: 0 on success, 2 on bad arguments or a bad history (the error
// names the line and position), 1 on any other error.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct BadInput : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Options {
  std::string package;
  int64_t k = -1;
  int64_t route = -1;
  bool exclude_seen = true;
  bool json = false;
  int threads = 0;
  int bench = 0;
  std::vector<std::string> items;
};

int64_t parse_int(const std::string& s, const std::string& what) {
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || errno != 0 || end != s.c_str() + s.size())
    throw BadInput(what + ": '" + s + "' is not an integer");
  return v;
}

Options parse_args(int argc, char** argv) {
  Options o;
  std::vector<std::string> args(argv + 1, argv + argc);
  auto value = [&](size_t& i) -> const std::string& {
    if (i + 1 >= args.size()) throw BadInput(args[i] + " needs a value");
    return args[++i];
  };
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "-k") {
      o.k = parse_int(value(i), "-k");
    } else if (a == "--route") {
      o.route = parse_int(value(i), "--route");
    } else if (a == "--keep-seen") {
      o.exclude_seen = false;
    } else if (a == "--json") {
      o.json = true;
    } else if (a == "--threads") {
      o.threads = static_cast<int>(parse_int(value(i), "--threads"));
    } else if (a == "--bench") {
      o.bench = static_cast<int>(parse_int(value(i), "--bench"));
    } else if (a == "-h" || a == "--help") {
      throw BadInput("usage");
    } else if (o.package.empty()) {
      o.package = a;
    } else {
      o.items.push_back(a);
    }
  }
  if (o.package.empty()) throw BadInput("no package given");
  return o;
}

// What the package says about itself (canet_kernels.serving.package_metadata).
struct Meta {
  int64_t n_items = 0, max_len = 0, k = 0, num_routes = 0;
};

Meta read_meta(torch::inductor::AOTIModelPackageLoader& loader) {
  const auto m = loader.get_metadata();
  auto get = [&](const char* key) {
    auto it = m.find(key);
    if (it == m.end())
      throw std::runtime_error(std::string("the package has no '") + key +
                               "' metadata: not a canet serving package");
    return parse_int(it->second, key);
  };
  return {get("canet.n_items"), get("canet.max_len"), get("canet.k"),
          get("canet.num_routes")};
}

// Item ids of one history; errors name the position (0-based).
std::vector<int64_t> parse_history(const std::vector<std::string>& tokens,
                                   const Meta& meta) {
  if (tokens.empty())
    throw BadInput("the history is empty: a recommendation needs at least one item");
  std::vector<int64_t> ids;
  ids.reserve(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) {
    int64_t v;
    try {
      v = parse_int(tokens[i], "item");
    } catch (const BadInput&) {
      throw BadInput("history[" + std::to_string(i) + "] = '" + tokens[i] +
                     "' is not an integer item id");
    }
    if (v < 1 || v > meta.n_items)
      throw BadInput("history[" + std::to_string(i) + "] = " + std::to_string(v) +
                     ": item ids must be in 1.." + std::to_string(meta.n_items) +
                     " (0 is padding)");
    ids.push_back(v);
  }
  return ids;
}

std::vector<std::string> split(const std::string& line) {
  std::string s = line;
  std::replace(s.begin(), s.end(), ',', ' ');
  std::istringstream in(s);
  std::vector<std::string> out;
  for (std::string t; in >> t;) out.push_back(t);
  return out;
}

struct Result {
  std::vector<int64_t> items;
  std::vector<float> scores;
  int64_t route, emb, hidden, depth;
};

// One request: the last max_len ids in, top-k out.
Result recommend(torch::inductor::AOTIModelPackageLoader& loader, const Meta& meta,
                 const std::vector<int64_t>& history, const Options& o,
                 int64_t k) {
  const auto opts = at::TensorOptions().dtype(at::kLong);
  const int64_t T = std::min<int64_t>(history.size(), meta.max_len);
  at::Tensor seen = at::tensor(history, opts);
  at::Tensor items = seen.slice(0, seen.size(0) - T).contiguous();
  if (!o.exclude_seen) seen = at::zeros({1}, opts);  // id 0: excluded anyway
  at::Tensor route = at::full({1}, o.route, opts);
  const std::vector<at::Tensor> out = loader.run({items, seen, route});
  // Excluded items score -inf: at most n_items - |distinct seen| are real.
  int64_t valid = meta.n_items;
  if (o.exclude_seen)
    valid -= static_cast<int64_t>(std::set<int64_t>(history.begin(), history.end()).size());
  const int64_t n = std::min(k, valid);
  Result r;
  const at::Tensor ids = out.at(0).contiguous(), scores = out.at(1).contiguous();
  for (int64_t i = 0; i < n; ++i) {
    r.items.push_back(ids[i].item<int64_t>());
    r.scores.push_back(scores[i].item<float>());
  }
  r.route = out.at(2)[0].item<int64_t>();
  r.emb = out.at(3)[0].item<int64_t>();
  r.hidden = out.at(4)[0].item<int64_t>();
  r.depth = out.at(5)[0].item<int64_t>();
  return r;
}

void print(const Result& r, bool json) {
  if (json) {
    std::printf("{\"items\": [");
    for (size_t i = 0; i < r.items.size(); ++i)
      std::printf("%s%lld", i ? ", " : "", static_cast<long long>(r.items[i]));
    std::printf("], \"scores\": [");
    for (size_t i = 0; i < r.scores.size(); ++i)
      std::printf("%s%.9g", i ? ", " : "", static_cast<double>(r.scores[i]));
    std::printf("], \"route\": %lld, \"emb\": %lld, \"hidden\": %lld, \"depth\": %lld}\n",
                static_cast<long long>(r.route), static_cast<long long>(r.emb),
                static_cast<long long>(r.hidden), static_cast<long long>(r.depth));
  } else {
    std::printf("route %lld (emb %lld, hidden %lld, depth %lld):",
                static_cast<long long>(r.route), static_cast<long long>(r.emb),
                static_cast<long long>(r.hidden), static_cast<long long>(r.depth));
    for (size_t i = 0; i < r.items.size(); ++i)
      std::printf(" %lld (%.4f)", static_cast<long long>(r.items[i]),
                  static_cast<double>(r.scores[i]));
    std::printf("\n");
  }
  std::fflush(stdout);
}

void bench(torch::inductor::AOTIModelPackageLoader& loader, const Meta& meta,
           const std::vector<int64_t>& history, const Options& o, int64_t k) {
  for (int i = 0; i < 10; ++i) recommend(loader, meta, history, o, k);
  std::vector<double> ms;
  for (int i = 0; i < o.bench; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    recommend(loader, meta, history, o, k);
    const std::chrono::duration<double, std::milli> dt =
        std::chrono::steady_clock::now() - t0;
    ms.push_back(dt.count());
  }
  std::sort(ms.begin(), ms.end());
  auto pct = [&](double p) {
    return ms[std::min(ms.size() - 1, static_cast<size_t>(std::lround(p * (ms.size() - 1))))];
  };
  std::fprintf(stderr, "canet_serve: %d requests of %zu items: p50 %.3f ms, p99 %.3f ms\n",
               o.bench, history.size(), pct(0.5), pct(0.99));
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  try {
    o = parse_args(argc, argv);
  } catch (const BadInput& e) {
    const std::string what = e.what();
    if (what != "usage") std::fprintf(stderr, "canet_serve: %s\n", what.c_str());
    std::fprintf(stderr,
                 "usage: canet_serve PACKAGE.pt2 [-k K] [--route R] [--keep-seen] "
                 "[--json] [--threads N] [--bench N] [ITEM ...]\n");
    return what == "usage" ? 0 : 2;
  }
  try {
    if (o.threads > 0) at::set_num_threads(o.threads);
    c10::InferenceMode guard;
    torch::inductor::AOTIModelPackageLoader loader(o.package);
    const Meta meta = read_meta(loader);
    const int64_t k = o.k < 0 ? meta.k : o.k;
    if (k < 1 || k > meta.k) {
      std::fprintf(stderr, "canet_serve: -k must be in 1..%lld (the package's k)\n",
                   static_cast<long long>(meta.k));
      return 2;
    }
    if (o.route < -1 || o.route >= meta.num_routes) {
      std::fprintf(stderr, "canet_serve: --route must be a route id in 0..%lld\n",
                   static_cast<long long>(meta.num_routes - 1));
      return 2;
    }
    int status = 0;
    auto serve = [&](const std::vector<std::string>& tokens, const std::string& where) {
      try {
        const auto history = parse_history(tokens, meta);
        print(recommend(loader, meta, history, o, k), o.json);
        if (o.bench > 0) bench(loader, meta, history, o, k);
      } catch (const BadInput& e) {
        std::fprintf(stderr, "canet_serve: %s%s\n", where.c_str(), e.what());
        if (o.json) std::printf("{\"error\": \"%s\"}\n", e.what());
        status = 2;
      }
    };
    if (!o.items.empty()) {
      serve(o.items, "");
    } else {
      std::string line;
      for (int lineno = 1; std::getline(std::cin, line); ++lineno)
        serve(split(line), "line " + std::to_string(lineno) + ": ");
    }
    return status;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "canet_serve: error: %s\n", e.what());
    return 1;
  }
}
