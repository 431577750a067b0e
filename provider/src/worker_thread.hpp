// At most one short-lived worker thread for an owner (the server's refill ahead, the
// client's fetch of announced keys): made on demand, never in OSSL_provider_init (nginx
// forks after loading providers); joined at shutdown; in a forked child the parent's thread
// does not exist and is left alone.
//
// Every member but join() is called under the owner's mutex; the thread's body calls
// done() under that mutex as its last step.
#pragma once

#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <utility>

#include "qkd/core/result.hpp"

namespace qkd::prov {

class WorkerThread {
 public:
  WorkerThread() = default;
  WorkerThread(const WorkerThread&) = delete;
  WorkerThread& operator=(const WorkerThread&) = delete;

  [[nodiscard]] bool running() const { return running_; }

  // Starts `body` on a new thread unless one is running (false then, or when no thread can
  // be made: the caller does the work in line later). The body must not throw (an
  // exception escaping a thread ends the process): see caught() below.
  template <typename F>
  bool start(F&& body) {
    if (running_) {
      return false;
    }
    if (thread_.joinable()) {
      thread_.join();  // finished (done() was called): returns at once
    }
    try {
      thread_ = std::thread(std::forward<F>(body));
    } catch (const std::exception&) {
      return false;
    }
    running_ = true;
    return true;
  }

  void done() { running_ = false; }

  // In a forked child: neither join nor detach the parent's thread; its handle is left
  // behind (a few bytes) so that no destructor ever touches it.
  void forget_after_fork() {
    if (thread_.joinable()) {
      (void)new std::thread(std::move(thread_));  // NOLINT: deliberately leaked
    }
    running_ = false;
  }

  // Waits for the thread (shutdown, after the owner stopped giving it work). Takes the
  // owner's mutex only to take the thread's handle: the body needs that mutex to finish.
  template <typename Mutex>
  void join(Mutex& owner_mu) {
    std::thread t;
    {
      std::lock_guard lock(owner_mu);
      t = std::move(thread_);
    }
    if (t.joinable()) {
      t.join();
    }
  }

 private:
  std::thread thread_;
  bool running_ = false;
};

// Runs a KME call and turns an exception (std::bad_alloc from a full secure heap, say) into
// an error, so that a worker thread never dies of one and a caller's bookkeeping (keys
// marked in flight, a batch marked fetching) is always settled.
template <typename F>
auto caught(F&& call) noexcept -> decltype(call()) {
  using qkd::core::ErrorCode;
  using qkd::core::make_error;
  try {
    return call();
  } catch (const std::exception& e) {
    try {
      return make_error(ErrorCode::kInternal, std::string("KME call failed: ") + e.what());
    } catch (...) {
    }
  } catch (...) {
  }
  return make_error(ErrorCode::kInternal, "out of memory");  // fits std::string's inline buffer
}

}  // namespace qkd::prov
