// Fuzz target: the store core (make_memory_key_store; the durable store runs the same core)
// driven by a sequence of operations, peer notices among them as a hostile or broken peer
// KME could send them: assignments with any offset, length, direction, key_ID and SAEs,
// discards, replayed notice numbers, a pool reset.
//
// Input: operations, each an opcode byte and its arguments (see run()); the input ends them.
// The pool's bytes are random, so any 8 of them in a row tell where in the pool they lie.
// Checks, for every key handed out (allocate to the master, take to a slave):
//   - no pool byte is ever handed out under two key_IDs (the same key_ID to its master and
//     to each of its slaves is one key);
//   - no SAE gets the same key_ID twice;
//   - allocate gives `number` keys of `size` bytes, take all requested keys or none.
#include <array>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "qkd/kms/key_store.hpp"

namespace {

using qkd::kms::Direction;
using qkd::kms::KeyAssignment;

const std::array<std::string, 6> kIds = {"6f1c2a0e-55d4-4a43-9c1e-2b7f0c9d4e11",
                                         "0b7e2c55-1f0a-4d8e-8f3a-6a1b2c3d4e5f",
                                         "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d",
                                         "11111111-2222-4333-8444-555555555555",
                                         "not-a-uuid",
                                         ""};
const std::array<std::string, 4> kSaes = {"s1", "s2", "peer", "m"};

class Run {
 public:
  explicit Run(std::span<const std::uint8_t> in) : in_(in) {}

  void run() {
    while (pos_ < in_.size()) {
      switch (next() % 6) {
        case 0:
          commit(64 * (next() % 16 + 1));
          break;
        case 1:
          (void)store_->apply_peer_assignment(assignment());
          break;
        case 2:
          (void)store_->apply_peer_notice(next(), {assignment(), assignment()});
          break;
        case 3:
          allocate();
          break;
        case 4:
          take();
          break;
        default:
          if (next() == 0xA5) {  // rare: the link's reset
            store_->reset_pool();
            base_ += std::uint64_t{1} << 40;
            committed_ = 0;
          }
      }
    }
  }

 private:
  std::uint8_t next() { return pos_ < in_.size() ? in_[pos_++] : 0; }
  std::uint16_t next16() { return static_cast<std::uint16_t>(next() << 8 | next()); }

  // A block of random bytes; every 8-byte window of the pool is indexed by its position.
  void commit(std::size_t n) {
    std::vector<std::uint8_t> block(n);
    for (auto& b : block) {
      rng_ = rng_ * 6364136223846793005ULL + 1442695040888963407ULL;
      b = static_cast<std::uint8_t>(rng_ >> 56);
    }
    store_->commit(block);
    tail_.insert(tail_.end(), block.begin(), block.end());
    // tail_: the previous blocks' last 7 bytes, then this block.
    const std::uint64_t tail_start = base_ + committed_ + n - tail_.size();
    for (std::size_t i = 0; i + 8 <= tail_.size(); ++i) {
      where_[window(tail_.data() + i)] = tail_start + i;
    }
    committed_ += n;
    tail_.erase(tail_.begin(), tail_.end() - 7);  // windows across the next block's start
  }
  static std::uint64_t window(const std::uint8_t* p) {
    std::uint64_t w = 0;
    for (int k = 0; k < 8; ++k) {
      w = w << 8 | p[k];
    }
    return w;
  }

  KeyAssignment assignment() {
    KeyAssignment a;
    const std::uint8_t flags = next();
    a.key_id = kIds[flags % kIds.size()];
    a.direction = (flags & 0x08) != 0 ? Direction::kAlice : Direction::kBob;  // own: kAlice
    a.discard = (flags & 0x10) != 0;
    a.offset = next16();
    a.length = next();
    a.master_sae = (flags & 0x20) != 0 ? "peer" : kSaes[next() % kSaes.size()];
    const std::uint8_t slaves = next();
    for (std::size_t i = 0; i < kSaes.size(); ++i) {
      if ((slaves >> i & 1) != 0) {
        a.slave_saes.push_back(kSaes[i]);
      }
    }
    return a;
  }

  void allocate() {
    const std::uint8_t b = next();
    const std::uint32_t number = b % 3 + 1;
    const std::uint32_t size = (b & 0x10) != 0 ? 64 : 32;
    std::vector<std::string> local;
    if ((b & 0x20) != 0) {
      local.push_back("s1");
    }
    if ((b & 0x40) != 0) {
      local.push_back("s2");
    }
    auto keys = store_->allocate("m", {"peer"}, local, number, size);
    if (!keys.ok()) {
      return;
    }
    if (keys->size() != number) {
      std::abort();
    }
    for (const auto& k : *keys) {
      if (k.key.size() != size) {
        std::abort();
      }
      handed_out("m", k);
      allocated_.push_back(k.key_id);
    }
  }

  void take() {
    const std::uint8_t b = next();
    const std::string& caller = kSaes[b % kSaes.size()];
    const std::string& master = kSaes[(b >> 2) % kSaes.size()];
    std::vector<std::string> ids;
    const std::uint8_t pick = next();
    for (std::size_t i = 0; i < kIds.size(); ++i) {
      if ((pick >> i & 1) != 0) {
        ids.push_back(kIds[i]);
      }
    }
    if ((pick & 0xC0) != 0 && !allocated_.empty()) {
      ids.push_back(allocated_[next() % allocated_.size()]);
    }
    if (ids.empty()) {
      return;
    }
    auto keys = store_->take(caller, master, ids, std::chrono::milliseconds(0));
    if (!keys.ok()) {
      return;
    }
    if (keys->size() != ids.size()) {
      std::abort();  // all or nothing
    }
    for (const auto& k : *keys) {
      handed_out(caller, k);
    }
  }

  // Records a key handed to `sae`, and checks the rules above.
  void handed_out(const std::string& sae, const qkd::kms::DeliveredKey& k) {
    if (!given_.emplace(sae, k.key_id).second) {
      std::abort();  // the same key_ID twice to one SAE
    }
    const std::uint8_t* p = k.key.data();
    for (std::size_t i = 0; i + 8 <= k.key.size(); ++i) {
      const auto it = where_.find(window(p + i));
      if (it == where_.end()) {
        continue;  // a window across two chunks of a direction: not contiguous in the pool
      }
      for (std::uint64_t pos = it->second; pos < it->second + 8; ++pos) {
        const auto [owner, fresh] = owner_.emplace(pos, k.key_id);
        if (!fresh && owner->second != k.key_id) {
          std::abort();  // a pool byte handed out under two key_IDs
        }
      }
    }
  }

  std::span<const std::uint8_t> in_;
  std::size_t pos_ = 0;
  std::unique_ptr<qkd::kms::KeyStore> store_ = qkd::kms::make_memory_key_store(Direction::kAlice);
  std::uint64_t rng_ = 0x9E3779B97F4A7C15ULL;
  std::uint64_t base_ = 0;       // positions of the current pool epoch start here
  std::uint64_t committed_ = 0;  // bytes committed in this epoch
  std::vector<std::uint8_t> tail_;
  std::unordered_map<std::uint64_t, std::uint64_t> where_;  // 8-byte window -> position
  std::unordered_map<std::uint64_t, std::string> owner_;    // position -> key_ID
  std::set<std::pair<std::string, std::string>> given_;     // (SAE, key_ID)
  std::vector<std::string> allocated_;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size > 4096) {
    return 0;
  }
  Run(std::span<const std::uint8_t>(data, size)).run();
  return 0;
}
