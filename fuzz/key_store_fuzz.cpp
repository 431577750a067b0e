// Fuzz target: the store core (make_memory_key_store; the durable store runs the same core
// over a journal, which this target does not reach) driven by a sequence of operations, peer
// notices among them as a hostile or broken peer KME could send them: assignments with any
// key_ID, direction, offset (up to 2^64 - 1), length and SAEs, discards, and a pool reset;
// prepared keys (store.prepared_keys) switched on with any depth, and withdrawn.
//
// Input: operations, each an opcode byte and its argument bytes (see run()); the input
// ends them. The fuzzer keeps its own copy of both directions' bytes (chunk c of the pool
// belongs to direction c % 2) and knows where every key came from: own keys from the
// allocation's notice, peer keys from the assignments it sent. Checks, for every key handed
// out (allocate to the master, take to a slave):
//   - its bytes are the pool bytes it was assigned (a used byte is wiped: handing it out
//     again shows as zeros);
//   - no pool byte is handed out under two key_IDs (the same key_ID to its master and to
//     each of its slaves is one key);
//   - no SAE gets the same key_ID twice;
//   - allocate gives `number` keys of `size` bytes; take all requested keys or none.
#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "qkd/kms/key_store.hpp"

namespace {

using qkd::kms::Direction;
using qkd::kms::kChunkBytes;
using qkd::kms::KeyAssignment;

constexpr Direction kOwn = Direction::kAlice;
constexpr Direction kPeer = Direction::kBob;

const std::array<std::string, 6> kIds = {"6f1c2a0e-55d4-4a43-9c1e-2b7f0c9d4e11",
                                         "0b7e2c55-1f0a-4d8e-8f3a-6a1b2c3d4e5f",
                                         "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d",
                                         "11111111-2222-4333-8444-555555555555",
                                         "not-a-uuid",
                                         ""};
const std::array<std::string, 4> kSaes = {"s1", "s2", "peer", "m"};

// Where a key's bytes lie: pool epoch, direction, offset, length.
using Place = std::tuple<unsigned, int, std::uint64_t, std::uint32_t>;

class Run {
 public:
  explicit Run(std::span<const std::uint8_t> in) : in_(in) {
    store_->set_assignment_listener([this](const std::vector<KeyAssignment>& as) {
      for (const auto& a : as) {
        if (!a.discard) {
          own_places_[a.key_id] = Place{epoch_, static_cast<int>(a.direction), a.offset, a.length};
        }
      }
    });
    epochs_.emplace_back();
  }

  void run() {
    while (pos_ < in_.size()) {
      switch (next() % 6) {
        case 0:
          commit(64 * (next() % 16 + 1));
          break;
        case 1: {
          KeyAssignment a = assignment();
          (void)store_->apply_peer_assignment(a);
          break;
        }
        case 2: {
          const std::uint8_t seq = next();
          std::vector<KeyAssignment> as;
          as.push_back(assignment());
          as.push_back(assignment());
          (void)store_->apply_peer_notice(seq, std::move(as));
          break;
        }
        case 3:
          allocate();
          break;
        case 4:
          take();
          break;
        default: {
          const std::uint8_t what = next();
          if (what == 0xA5) {  // rare: the link's reset
            store_->reset_pool();
            ++epoch_;
            epochs_.emplace_back();
          } else if (what == 0x5A) {  // store.prepared_keys: keys allocated ahead
            store_->set_prepared_keys(next() % 8);
          } else if (what == 0x3C) {  // a clean stop's withdrawal of the prepared keys
            store_->withdraw_prepared();
          }
        }
      }
    }
  }

 private:
  struct Epoch {
    std::uint64_t committed = 0;
    std::array<std::vector<std::uint8_t>, 2> bytes;             // each direction's stream
    std::array<std::map<std::uint64_t, std::string>, 2> owner;  // offset -> key_ID
  };

  std::uint8_t next() { return pos_ < in_.size() ? in_[pos_++] : 0; }
  std::uint16_t next16() {
    const std::uint8_t hi = next();
    const std::uint8_t lo = next();
    return static_cast<std::uint16_t>(hi << 8 | lo);
  }

  void commit(std::size_t n) {
    std::vector<std::uint8_t> block(n);
    Epoch& e = epochs_.back();
    for (auto& b : block) {
      rng_ = rng_ * 6364136223846793005ULL + 1442695040888963407ULL;
      b = static_cast<std::uint8_t>(rng_ >> 56);
      e.bytes[(e.committed / kChunkBytes) % 2].push_back(b);
      ++e.committed;
    }
    store_->commit(block);
  }

  // A peer assignment; recorded (when it names the peer's direction) as a place its key_ID
  // may come from.
  KeyAssignment assignment() {
    KeyAssignment a;
    const std::uint8_t flags = next();
    a.key_id = kIds[flags % kIds.size()];
    a.direction = (flags & 0x08) != 0 ? kOwn : kPeer;
    a.discard = (flags & 0x10) != 0;
    if ((flags & 0x40) != 0) {
      // Anywhere: just below 2^64 (offset + length wraps around to a small end), far beyond
      // the pool, or any 64-bit offset with any 32-bit length.
      switch (next() % 3) {
        case 0:
          a.offset = std::numeric_limits<std::uint64_t>::max() - next16();
          a.length = next16();
          break;
        case 1:
          a.offset = std::uint64_t{next16()} << 32 | next16();
          a.length = next();
          break;
        default:
          a.offset = std::uint64_t{next16()} << 48 | std::uint64_t{next16()} << 32 |
                     std::uint64_t{next16()} << 16 | next16();
          a.length = static_cast<std::uint32_t>(next16()) << 16 | next16();
      }
    } else {
      a.offset = next16();
      a.length = next();
    }
    if ((flags & 0x20) != 0) {
      a.master_sae = "peer";
    } else {
      a.master_sae = kSaes[next() % kSaes.size()];
    }
    const std::uint8_t slaves = next();
    for (std::size_t i = 0; i < kSaes.size(); ++i) {
      if ((slaves >> i & 1) != 0) {
        a.slave_saes.push_back(kSaes[i]);
      }
    }
    if (!a.discard && a.direction == kPeer) {
      peer_places_[a.key_id].insert(Place{epoch_, static_cast<int>(kPeer), a.offset, a.length});
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
    const std::uint8_t pick = next();
    std::vector<std::string> ids;
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

  // The bytes at `place`, if the pool held them.
  std::span<const std::uint8_t> bytes_at(const Place& place) const {
    const auto& [epoch, dir, offset, length] = place;
    const auto& stream = epochs_.at(epoch).bytes.at(static_cast<std::size_t>(dir));
    if (offset > stream.size() || length > stream.size() - offset) {
      return {};
    }
    return std::span<const std::uint8_t>(stream).subspan(offset, length);
  }

  // Records a key handed to `sae`, and checks the rules above.
  void handed_out(const std::string& sae, const qkd::kms::DeliveredKey& k) {
    if (!given_.emplace(sae, k.key_id).second) {
      std::abort();  // the same key_ID twice to one SAE
    }
    const std::span<const std::uint8_t> key(k.key.data(), k.key.size());
    auto same = [&](const Place& p) {
      const auto b = bytes_at(p);
      return b.size() == key.size() && !key.empty() && std::equal(b.begin(), b.end(), key.begin());
    };
    std::vector<Place> from;  // where it may come from
    if (const auto own = own_places_.find(k.key_id); own != own_places_.end()) {
      from.push_back(own->second);
    } else if (const auto peer = peer_places_.find(k.key_id); peer != peer_places_.end()) {
      std::copy_if(peer->second.begin(), peer->second.end(), std::back_inserter(from), same);
    }
    if (from.empty() || !same(from.front())) {
      std::abort();  // bytes that are not the pool bytes any assignment named
    }
    if (from.size() > 1) {
      return;  // equal bytes at two places (a short key): cannot tell which
    }
    const auto& [epoch, dir, offset, length] = from.front();
    auto& owner = epochs_[epoch].owner[static_cast<std::size_t>(dir)];
    for (std::uint64_t i = offset; i < offset + length; ++i) {
      const auto [it, fresh] = owner.emplace(i, k.key_id);
      if (!fresh && it->second != k.key_id) {
        std::abort();  // a pool byte handed out under two key_IDs
      }
    }
  }

  std::span<const std::uint8_t> in_;
  std::size_t pos_ = 0;
  std::unique_ptr<qkd::kms::KeyStore> store_ = qkd::kms::make_memory_key_store(kOwn);
  std::uint64_t rng_ = 0x9E3779B97F4A7C15ULL;
  unsigned epoch_ = 0;
  std::vector<Epoch> epochs_;
  std::map<std::string, Place> own_places_;              // allocations' notices
  std::map<std::string, std::set<Place>> peer_places_;   // assignments sent
  std::set<std::pair<std::string, std::string>> given_;  // (SAE, key_ID)
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
