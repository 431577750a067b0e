// fork() while another thread holds a provider lock: the child inherits the lock held by a
// thread that does not exist there, and its first handshake would block for ever (Python's
// multiprocessing, a server forking workers while serving). Objects with such a lock
// register here; pthread_atfork handlers (installed once) take every registered lock
// before fork() and release it after, in the parent and in the child, where each object may
// also reset what a phantom thread could have left (a condition variable's waiters).
#pragma once

#include <mutex>

namespace qkd::prov {

class ForkGuarded {
 public:
  ForkGuarded(const ForkGuarded&) = delete;
  ForkGuarded& operator=(const ForkGuarded&) = delete;

  // Called by the handlers, in the forking thread: the owner's mutex is taken before
  // fork() and released after it, in the child after reset_in_child().
  void lock_for_fork() { mu_.lock(); }
  void unlock_in_parent() { mu_.unlock(); }
  void unlock_in_child() {
    reset_in_child();
    mu_.unlock();
  }

 protected:
  // `mu`: the derived object's lock (a member not yet made when this runs: only kept).
  explicit ForkGuarded(std::mutex& mu) : mu_(mu) {}
  ~ForkGuarded() = default;
  // The derived class calls these at the end of its constructor and at the start of its
  // destructor, so that the handlers never see it half made.
  void guard_forks();
  void unguard_forks();
  // In the child, with the lock held: reset what a thread that does not exist there may
  // have left (a condition variable's waiters).
  virtual void reset_in_child() {}

 private:
  std::mutex& mu_;
};

}  // namespace qkd::prov
