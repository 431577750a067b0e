// The in-process transport pair: two queues under one mutex.
#include <condition_variable>
#include <deque>
#include <mutex>

#include "qkd/core/link.hpp"

namespace qkd::core {
namespace {

struct Shared {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::vector<std::uint8_t>> queue[2];  // queue[i]: messages for end i
  bool closed = false;
};

class MemoryTransport final : public MessageTransport {
 public:
  MemoryTransport(std::shared_ptr<Shared> shared, int self) : s_(std::move(shared)), self_(self) {}
  ~MemoryTransport() override { close(); }

  Status send(std::vector<std::uint8_t> message) override {
    {
      std::lock_guard<std::mutex> lock(s_->mu);
      if (s_->closed) {
        return make_error(ErrorCode::kClosed, "memory transport closed");
      }
      s_->queue[1 - self_].push_back(std::move(message));
    }
    s_->cv.notify_all();
    return ok_status();
  }

  Result<std::vector<std::uint8_t>> receive(std::chrono::milliseconds timeout) override {
    std::unique_lock<std::mutex> lock(s_->mu);
    auto& q = s_->queue[self_];
    if (!s_->cv.wait_for(lock, timeout, [&] { return s_->closed || !q.empty(); })) {
      return make_error(ErrorCode::kTimeout, "memory transport: no message within timeout");
    }
    if (s_->closed) {
      return make_error(ErrorCode::kClosed, "memory transport closed");
    }
    std::vector<std::uint8_t> m = std::move(q.front());
    q.pop_front();
    return m;
  }

  void close() override {
    {
      std::lock_guard<std::mutex> lock(s_->mu);
      s_->closed = true;
    }
    s_->cv.notify_all();
  }

 private:
  std::shared_ptr<Shared> s_;
  int self_;
};

}  // namespace

TransportPair make_memory_transport_pair() {
  auto shared = std::make_shared<Shared>();
  return TransportPair{std::make_unique<MemoryTransport>(shared, 0),
                       std::make_unique<MemoryTransport>(shared, 1)};
}

}  // namespace qkd::core
